"""Results and records read as the pipeline's types, after their JSON is checked against the
hand-written schemas in tests/schemas (``save_record.json``, ``load_record.json``, ...): the
schemas say what a record must hold independently of pipeline_lib/verify/results.py, and
tests/test_schemas.py proves that the two agree and that each check can fail."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import jsonschema
from referencing import Registry, Resource

from pipeline_lib.common.atomic import read_json

SCHEMAS = Path(__file__).resolve().parent / "schemas"


def schema_name(cls) -> str:
    """The schema file of a type: SaveRecord -> save_record.json."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower() + ".json"


@cache
def _registry() -> Registry:
    """Every JSON schema of tests/schemas, by its $id (the Parquet tables' copies are lists)."""
    found = [json.loads(path.read_text()) for path in sorted(SCHEMAS.glob("*.json"))]
    schemas = [s for s in found if isinstance(s, dict) and "$id" in s]
    return Registry().with_resources((s["$id"], Resource.from_contents(s)) for s in schemas)


@cache
def validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / name).read_text())
    return jsonschema.Draft202012Validator(schema, registry=_registry())


def problems(data, cls) -> list[str]:
    """Every way ``data`` breaks the schema of ``cls``: ``path: message`` each."""
    found = validator(schema_name(cls)).iter_errors(data)
    return [f"{'/'.join(map(str, e.absolute_path)) or '.'}: {e.message}" for e in found]


def columns(table: str) -> list[str]:
    """The columns of a Parquet table (tests/schemas/<table>.json, test_schemas' copies)."""
    return [column[0] for column in json.loads((SCHEMAS / f"{table}.json").read_text())]


def checked(data: dict, cls, where: str = ""):
    """``cls.from_dict(data)`` once ``data`` holds to its schema (a load record's rows: to
    the Parquet columns) and the type writes back exactly ``data``."""
    assert not (found := problems(data, cls)), f"{where or cls.__name__}: {found}"
    for kind, table in (("cells", "matrix"), ("tensors", "tensors")):
        for row in data.get(kind, []) if cls.__name__ == "LoadRecord" else []:
            assert sorted(row) == sorted(columns(table)), (where, kind, row)
    typed = cls.from_dict(data)
    # json text: NaN (a loss, a difference) is equal to itself there
    back = json.dumps(typed.to_dict(), sort_keys=True)
    assert back == json.dumps(data, sort_keys=True), f"{where}: the round trip changed it"
    return typed


def read_checked(path: str | Path, cls):
    """The record or result at ``path`` as ``cls`` (``checked``)."""
    return checked(read_json(path), cls, str(path))
