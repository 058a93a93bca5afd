"""Sweep stage: dBPB per bit width when only one matrix is quantized."""

from pathlib import Path

from pgolf.config import section
from pgolf.quant.gptq import GPTQConfig
from pgolf.quant.lqer import LQERConfig
from pgolf.quant.sweep import SweepConfig, build_sweep
from pgolf.stage import claim_gpus, logged, provenance

with logged(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    sm = snakemake  # noqa: F821
    claim_gpus(sm)
    build_sweep(
        *(Path(sm.input[k]) for k in ("model", "hessians", "shards", "tokenizer", "baseline")),
        sm.wildcards.matrix,
        Path(sm.output[0]),
        cfg=section(SweepConfig, sm.params.sweep, "sweep"),
        gptq=section(GPTQConfig, sm.params.gptq, "gptq"),
        seq_len=sm.params.seq_len,
        lqer=section(LQERConfig, sm.params.lqer, "lqer"),
        provenance=provenance(sm, stage="sweep"),
    )
