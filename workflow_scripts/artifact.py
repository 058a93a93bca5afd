"""Artifact stage: GPTQ per the allocation, pack, apply the size gate (code bytes from the DAG)."""

from pathlib import Path

from pgolf.config import section
from pgolf.quant.export import PackConfig, build_artifact
from pgolf.quant.gptq import GPTQConfig
from pgolf.quant.lqer import LQERConfig
from pgolf.stage import logged, provenance

with logged(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    sm = snakemake  # noqa: F821
    build_artifact(
        Path(sm.input.model),
        Path(sm.input.hessians),
        Path(sm.input.allocation),
        Path(sm.output.artifact),
        Path(sm.output.meta),
        gptq=section(GPTQConfig, sm.params.gptq, "gptq"),
        pack=section(PackConfig, sm.params.pack, "pack"),
        lqer=section(LQERConfig, sm.params.lqer, "lqer"),
        code=dict(sm.params.code_bytes),
        provenance=provenance(sm, stage="artifact"),
    )
