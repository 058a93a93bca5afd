"""Allocation stage: bits per quantizable tensor for one policy, with predicted bytes and dBPB."""

from pathlib import Path

from pgolf.config import section
from pgolf.quant.allocate import CHALLENGE_BYTES, RDConfig, UniformConfig, build_allocation
from pgolf.stage import logged, provenance

with logged(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    sm = snakemake  # noqa: F821
    policy, params = sm.wildcards.policy, dict(sm.params.allocate)
    limit = params.pop("limit_bytes", CHALLENGE_BYTES)
    code = params.pop("code_bytes", None)  # only the challenge budget reads it
    cls = {"uniform": UniformConfig, "rd": RDConfig}[policy]
    reference = sm.input.get("ref_artifact") and {
        "allocation": sm.input.ref_allocation, "artifact": sm.input.ref_artifact}
    build_allocation(
        Path(sm.input.model),
        Path(sm.input.sensitivity),
        policy,
        Path(sm.output[0]),
        cfg=section(cls, params, f"allocate.{policy}"),
        reference=reference,
        limit_bytes=limit,
        code_bytes=code,
        provenance=provenance(sm, stage="allocate"),
    )
