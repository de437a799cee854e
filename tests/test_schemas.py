"""The Parquet schemas the pipeline writes, against checked-in copies (tests/schemas/*.json).

matrix.parquet, tensors.parquet and selftest.parquet are read by people and tools outside this
repository: a change to their columns must be a deliberate edit. After one, regenerate the
copies with ``.venv/bin/python -m tests.test_schemas --write`` and commit them with the change.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

SCHEMAS = Path(__file__).resolve().parent / "schemas"
REGENERATE = ".venv/bin/python -m tests.test_schemas --write"


def current() -> dict[str, list]:
    """Every table's columns: [name, Arrow type, nullable] (selftest: its column names)."""
    from pipeline_lib.results import selftest
    from pipeline_lib.verify import records

    def fields(schema) -> list:
        return [[field.name, str(field.type), field.nullable] for field in schema]

    return {
        "matrix": fields(records.MATRIX_SCHEMA),
        "tensors": fields(records.TENSORS_SCHEMA),
        "selftest": list(selftest.COLUMNS),
    }


@pytest.mark.parametrize("table", ["matrix", "tensors", "selftest"])
def test_schema_matches_its_checked_in_copy(table):
    path = SCHEMAS / f"{table}.json"
    assert current()[table] == json.loads(path.read_text()), (
        f"the columns of {table}.parquet differ from {path.relative_to(SCHEMAS.parent.parent)}; "
        f"if the change is deliberate, regenerate the copies with `{REGENERATE}` and commit them"
    )


def write() -> None:
    for table, columns in current().items():
        lines = ",\n".join(f"  {json.dumps(column)}" for column in columns)
        (SCHEMAS / f"{table}.json").write_text(f"[\n{lines}\n]\n")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: {REGENERATE}")
    write()
