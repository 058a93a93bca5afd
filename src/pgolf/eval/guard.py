"""The damage-gap guard: refuse an artifact whose quantized model is near-uniform or far worse
than the float one, and say which tensors broke and how (seed-techniques A9, PR #1818)."""

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from pgolf.quant.artifact import Quantized
from pgolf.quant.codec import qmax


@dataclass(kw_only=True)
class GuardConfig:
    max_dbpb: float = 0.1  # roundtrip BPB may exceed prequant's by at most this
    margin_nats: float = 0.5  # a loss within this of ln(vocab) is a near-uniform model

    def __post_init__(self):
        if self.max_dbpb <= 0 or self.margin_nats < 0:
            raise ValueError(f"eval.guard: max_dbpb ({self.max_dbpb}) must be > 0 and "
                             f"margin_nats ({self.margin_nats}) >= 0")


def tensor_damage(name: str, W: torch.Tensor, stored, Wq: torch.Tensor) -> dict:
    """How far a stored tensor is from its float original: relative RMSE, and for GPTQ codes
    the step in row standard deviations (clip k = step * qmax), the mean error in steps (0 for
    round-to-nearest; floor rounding gives about -0.5) and how many levels the codes use."""
    W, Wq = W.float(), Wq.float()
    row = {"tensor": name, "rel_rmse": float((Wq - W).norm() / W.norm().clamp_min(1e-30))}
    if isinstance(stored, Quantized):
        scales = stored.scales.float()
        rows = W.reshape(W.shape[0], -1)
        sigma = rows.std(dim=1).clamp_min(1e-30)
        step = float((scales / sigma).median())
        error = ((Wq - W).reshape(rows.shape) / scales.clamp_min(1e-30)[:, None]).mean()
        row.update(bits=stored.bits, step_sigma=step, clip_sigma=step * qmax(stored.bits),
                   mean_error_steps=float(error), levels=int(stored.codes.unique().numel()),
                   max_levels=2 * qmax(stored.bits) + 1)
    return row


def diagnosis(row: dict) -> str:
    """One line per tensor; the telltales of #1818 (a clip far too wide for the bit width,
    biased codes) are spelled out."""
    text = f"  {row['tensor']}: relative RMSE {row['rel_rmse']:.2f}"
    if "bits" not in row:
        return text
    text += (f", int{row['bits']} step {row['step_sigma']:.2f} sigma (clip "
             f"{row['clip_sigma']:.1f} sigma), mean error {row['mean_error_steps']:+.2f} steps, "
             f"{row['levels']} of {row['max_levels']} levels used")
    notes = []
    if row["step_sigma"] > 0.5:
        notes.append(f"the clip is far too wide for int{row['bits']}: most weights round to "
                     "a few levels around 0")
    if abs(row["mean_error_steps"]) > 0.1:
        notes.append("the codes are biased (rounding after GPTQ, such as floor-division "
                     "value dedup?)")
    return text + "".join(f"\n      <- {note}" for note in notes)


def check_damage_gap(artifact: Path, quantized: dict, prequant: dict, *, vocab_size: int,
                     cfg: GuardConfig, damage) -> dict:
    """The guard's verdict for a roundtrip result against prequant's; raises ValueError naming
    the artifact and its worst tensors (`damage()` lists them, only computed on failure)."""
    ln_vocab = math.log(vocab_size)
    dbpb = quantized["bpb"] - prequant["bpb"]
    verdict = {"dbpb": dbpb, "max_dbpb": cfg.max_dbpb, "loss": quantized["loss"],
               "ln_vocab": ln_vocab, "margin_nats": cfg.margin_nats}
    # near-uniform after quantization but not before: an untrained float model is no damage gap
    floor = ln_vocab - cfg.margin_nats
    uniform = quantized["loss"] >= floor > prequant["loss"]
    if not uniform and dbpb <= cfg.max_dbpb:
        return {**verdict, "passed": True}
    problems = []
    if uniform:
        problems.append(f"its loss {quantized['loss']:.3f} nats/token is within "
                        f"{cfg.margin_nats} of ln({vocab_size}) = {ln_vocab:.3f}: the quantized "
                        "model is near-uniform (a broken embedding or LM head)")
    if dbpb > cfg.max_dbpb:
        problems.append(f"BPB {quantized['bpb']:.4f} is {dbpb:+.4f} over prequant "
                        f"{prequant['bpb']:.4f}, past eval.guard.max_dbpb = {cfg.max_dbpb}")
    worst = sorted(damage(), key=lambda r: r["rel_rmse"], reverse=True)[:5]
    raise ValueError(f"damage-gap guard: artifact {artifact}: " + "; ".join(problems)
                     + ".\nWorst tensors (dequantized vs float weights):\n"
                     + "\n".join(map(diagnosis, worst)))
