"""The models the quantized artifacts stand for, as the loop and generation analyses use them."""

from pathlib import Path

from pgolf.eval.run import artifact_model


def quantized_models(artifacts: dict[str, Path]) -> dict:
    """Each policy's model as its artifact stands for it (dequantized), in eval mode."""
    return {policy: artifact_model(path).eval() for policy, path in artifacts.items()}
