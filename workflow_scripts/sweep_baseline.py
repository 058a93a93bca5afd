"""Sweep baseline stage: the float model's per-window NLL on the fixed sweep subset."""

from pathlib import Path

from pgolf.config import section
from pgolf.quant.sweep import SweepConfig, build_baseline
from pgolf.stage import claim_gpus, logged, provenance

with logged(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    sm = snakemake  # noqa: F821
    claim_gpus(sm)
    build_baseline(
        Path(sm.input.model),
        Path(sm.input.shards),
        Path(sm.input.tokenizer),
        Path(sm.output[0]),
        cfg=section(SweepConfig, sm.params.sweep, "sweep"),
        seq_len=sm.params.seq_len,
        provenance=provenance(sm, stage="sweep_baseline"),
    )
