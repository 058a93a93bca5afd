"""Seeds stage: the per-seed eval table and paired statistics across seeds."""

from pathlib import Path

from pgolf.eval.seeds import write_seed_statistics
from pgolf.stage import logged, provenance

with logged(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    sm = snakemake  # noqa: F821
    write_seed_statistics(
        [Path(p) for p in sm.input.evals],
        [Path(p) for p in sm.input.artifacts],
        Path(sm.output.stats),
        Path(sm.output.table),
        page=Path(sm.output.page),
        seeds=list(sm.params.seeds),
        policies=list(sm.params.policies),
        modes=list(sm.params.modes),
        provenance=provenance(sm, stage="seeds"),
    )
