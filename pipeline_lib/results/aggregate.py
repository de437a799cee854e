"""Load-job records -> results/matrix.parquet and results/tensors.parquet (written atomically).

A record is one JSON object whose ``cells`` and ``tensors`` are lists of rows (driver.run_load_job).
pyarrow's JSON reader parses it in C++ straight into columns of the two schemas, records in
parallel: for 10,000 cells of 108 entries each (bench/benchmark.py) the stdlib parser and
``Table.from_pylist`` took 23 s on 2 cores, this takes 3 s.
"""

from __future__ import annotations

import os
import uuid
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from pipeline_lib.common.atomic import atomic_paths
from pipeline_lib.verify.records import MATRIX_SCHEMA, TENSORS_SCHEMA, agree_across_layouts

# A record as pyarrow reads it: one row, each list holding that record's rows.
RECORD_SCHEMA = pa.schema(
    [
        ("cells", pa.list_(pa.struct(list(MATRIX_SCHEMA)))),
        ("tensors", pa.list_(pa.struct(list(TENSORS_SCHEMA)))),
    ]
)


# Schema metadata key of both Parquet files: one value per aggregate run. The two files are
# renamed one after the other; a kill between the renames leaves tokens that differ, and the
# report refuses such a pair (results_token).
TOKEN_KEY = b"dcp_matrix.aggregate_token"


def results_token(matrix_path: str, tensors_path: str) -> str | None:
    """The aggregate run both files come from (None for files without a token: older ones);
    ValueError when they come from different runs."""
    tokens = [
        (pq.read_schema(p).metadata or {}).get(TOKEN_KEY) for p in (matrix_path, tensors_path)
    ]
    if tokens[0] != tokens[1]:
        raise ValueError(
            f"{matrix_path} and {tensors_path} come from different aggregate runs (an aggregate"
            " was interrupted between its two renames): run the aggregate rule again"
        )
    return tokens[0].decode() if tokens[0] else None


def read_record(path: str) -> pa.Table:
    """One record as a one-row table of RECORD_SCHEMA; keys outside it are ignored, a key
    a row lacks is null (as with ``Table.from_pylist``)."""
    return pa_json.read_json(
        path,
        # The whole object in one block: pyarrow never splits a row across blocks.
        read_options=pa_json.ReadOptions(use_threads=False, block_size=os.path.getsize(path) + 1),
        parse_options=pa_json.ParseOptions(
            explicit_schema=RECORD_SCHEMA,
            unexpected_field_behavior="ignore",
            newlines_in_values=True,  # write_json indents
        ),
    )


def rows(records: pa.Table, column: str) -> pa.Table:
    """The rows of every record's ``column`` list, as one table (of that list's row schema)."""
    return pa.Table.from_struct_array(pc.list_flatten(records[column]))


def aggregate(
    record_paths: list[str], matrix_path: str, tensors_path: str, git_commit: str
) -> None:
    # pyarrow releases the GIL while it parses, so the threads run in parallel.
    with ThreadPoolExecutor() as pool:
        records = pa.concat_tables(pool.map(read_record, record_paths))
    cells = rows(records, "cells")
    cells = cells.set_column(
        MATRIX_SCHEMA.get_field_index("git_commit"),
        MATRIX_SCHEMA.field("git_commit"),
        pa.array([git_commit] * cells.num_rows, pa.string()),
    )
    if pc.any(pc.equal(cells["save_framework"], "existing")).as_py():
        cells = pa.Table.from_pylist(agree_across_layouts(cells.to_pylist()), MATRIX_SCHEMA)
    token = uuid.uuid4().hex.encode()
    tables = [cells, rows(records, "tensors")]
    with atomic_paths(matrix_path, tensors_path) as tmps:
        for tmp, table in zip(tmps, tables, strict=True):
            metadata = {**(table.schema.metadata or {}), TOKEN_KEY: token}
            pq.write_table(table.replace_schema_metadata(metadata), tmp)
