"""Load-job records -> results/matrix.parquet and results/tensors.parquet (written atomically)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline_lib.atomic import read_json, write_with
from pipeline_lib.records import MATRIX_SCHEMA, TENSORS_SCHEMA


def aggregate(
    record_paths: list[str], matrix_path: str, tensors_path: str, git_commit: str
) -> None:
    cells, tensors = [], []
    for path in record_paths:
        record = read_json(path)
        cells.extend({**row, "git_commit": git_commit} for row in record["cells"])
        tensors.extend(record["tensors"])
    for path, rows, schema in (
        (matrix_path, cells, MATRIX_SCHEMA),
        (tensors_path, tensors, TENSORS_SCHEMA),
    ):
        table = pa.Table.from_pylist(rows, schema=schema)
        write_with(path, lambda tmp, table=table: pq.write_table(table, tmp))
