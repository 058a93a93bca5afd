"""Outliers analysis: per-tensor kurtosis and outliers beside Gaussian matrices of each shape."""

from pathlib import Path

from pgolf.analysis.outliers import build_outliers
from pgolf.stage import logged, provenance

with logged(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    sm = snakemake  # noqa: F821
    build_outliers(
        Path(sm.input.model),
        Path(sm.output.table),
        Path(sm.output.plot),
        draws=sm.params.outliers["draws"],
        provenance=provenance(sm, stage="analysis_outliers"),
    )
