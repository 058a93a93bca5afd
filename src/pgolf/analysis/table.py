"""An analysis output: a parquet table whose metadata says what it measures and against what."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pgolf.data.scores import read_metadata, write_table


def write_analysis(rows: list[dict], out: Path, *, definition: str, null: str, provenance=None,
                   **meta) -> None:
    """Rows as parquet, with the definition of the statistic and its null or noise floor (both
    required: a number without its baseline is not an analysis result) in the metadata."""
    assert definition and null, "every analysis states its definition and its null"
    record = provenance.record() if provenance else None
    write_table(pa.Table.from_pylist(rows), Path(out),
                {"definition": definition, "null": null, **meta, "provenance": record})


def read_analysis(path: Path) -> tuple[list[dict], dict]:
    """The rows and metadata of an analysis table."""
    return pq.read_table(path).to_pylist(), read_metadata(Path(path))
