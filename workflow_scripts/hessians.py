"""Hessians stage: X^T X of every quantizable matrix's input on training windows."""

from pathlib import Path

from pgolf.config import section
from pgolf.quant.hessian import HessianConfig, build_hessians
from pgolf.stage import claim_gpus, logged, provenance

with logged(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    sm = snakemake  # noqa: F821
    claim_gpus(sm)
    build_hessians(
        Path(sm.input.model),
        Path(sm.input.shards),
        Path(sm.output[0]),
        cfg=section(HessianConfig, sm.params.hessian, "hessian"),
        seq_len=sm.params.seq_len,
        seed=int(sm.wildcards.seed),
        provenance=provenance(sm, stage="hessians"),
    )
