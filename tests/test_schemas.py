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


# --- the results and records (hand-written JSON schemas: tests/record_schemas.py) -----------


def _property_names(schema: dict) -> set[str]:
    """The keys a record schema names: its own properties and those of what it refers to."""
    from tests.record_schemas import SCHEMAS

    parts = json.loads((SCHEMAS / "record_parts.json").read_text())["$defs"]
    names = set(schema.get("properties", {}))
    for part in [schema, *schema.get("allOf", [])]:
        if "$ref" in part:
            names |= _property_names(parts[part["$ref"].rpartition("/")[2]])
        elif part is not schema:
            names |= _property_names(part)
    return names


def _typed():
    from pipeline_lib.verify import results

    return [results.SaveResult, results.SaveRecord, results.ImportRecord, results.LoadResult,
            results.LoadRecord]  # fmt: skip


@pytest.mark.parametrize("cls", _typed(), ids=lambda cls: cls.__name__)
def test_each_record_schema_names_its_types_keys(cls):
    """The schema and the dataclass agree on every key (each written independently)."""
    from dataclasses import fields

    from tests.record_schemas import SCHEMAS, schema_name

    schema = json.loads((SCHEMAS / schema_name(cls)).read_text())
    assert _property_names(schema) == {f.name for f in fields(cls)}


def _save_record(**changes) -> dict:
    from tests.test_records import ENV, save_record

    facts = {"train_losses": [1.0], "loss_source": "model", "dropped_entries": [], "env": ENV,
             "added_entries": [], "frozen_saved": [], "peak_rss_mb": 100.0}  # fmt: skip
    return {**save_record(**facts).to_dict(), **changes}


def test_a_record_the_pipeline_would_write_passes_both_checks():
    from pipeline_lib.verify.results import SaveRecord
    from tests.record_schemas import checked

    record = checked(_save_record(), SaveRecord)
    assert record.layout.world_size == 2 and record.files_check["model.w"].equal


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"bogus": 1}, "'bogus' was unexpected"),
        ({"files_check": None}, "None is not of type 'object'"),
        ({"status": "passed"}, "'passed' is not one of"),
        # a failed save has a status and a reason, no facts
        ({"status": "crash", "state_check": {}}, "False schema does not allow {}"),
        ({"layout": {"name": "a"}}, "'framework' is a required property"),
    ],
)
def test_the_record_schema_refuses_what_the_pipeline_does_not_write(change, problem):
    from pipeline_lib.verify.results import SaveRecord
    from tests.record_schemas import problems

    assert any(problem in found for found in problems(_save_record(**change), SaveRecord))


def test_an_unknown_or_missing_key_is_an_error_naming_it():
    from pipeline_lib.common.json_form import FormError
    from pipeline_lib.common.layout import Layout
    from pipeline_lib.verify.results import LoadRecord, SaveRecord
    from tests.record_schemas import problems

    without = {k: v for k, v in _save_record(bogus=1).items() if k not in ("model", "checkpoint")}
    assert len(problems(without, SaveRecord)) == 3
    with pytest.raises(FormError, match=r"^SaveRecord: unknown key\(s\) bogus; missing key\(s\) "
                       r"checkpoint, model$"):  # fmt: skip
        SaveRecord.from_dict(without)
    with pytest.raises(FormError, match=r"^EntryComparison: missing key\(s\) note$"):
        SaveRecord.from_dict(_save_record(files_check={"w": {"equal": True, "max_abs_diff": 0}}))
    with pytest.raises(FormError, match=r"^FaultTag: unknown key\(s\) kind"):
        LoadRecord.from_dict({"cells": [], "tensors": [], "launches": 1, "fault": {"kind": "x"}})
    layout = Layout("a", "fsdp2_tp", (2, 2), ("dp", "tp"), "tp").to_dict()
    with pytest.raises(FormError, match=r"^Layout a: world_size 2 is not its mesh's$"):
        Layout.from_dict({**layout, "world_size": 2})
    assert Layout.from_dict(layout).tp_degree == 2


def write() -> None:
    for table, columns in current().items():
        lines = ",\n".join(f"  {json.dumps(column)}" for column in columns)
        (SCHEMAS / f"{table}.json").write_text(f"[\n{lines}\n]\n")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: {REGENERATE}")
    write()
