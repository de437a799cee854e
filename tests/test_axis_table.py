"""Each checkpointing axis declared once (pipeline_lib/verify/axis_table.py): Variant's fields,
the config keys, the Parquet columns, the config schema's enums and docs/config.md's tables
agree with the declaration, and a config or an expectations file that uses an axis's old key
is refused with one line naming the new one."""

from __future__ import annotations

import copy
import dataclasses
import re

import pytest

from pipeline_lib.common import doc_tables
from pipeline_lib.plan import axes, config, expectations
from pipeline_lib.plan.schema import load_schema
from pipeline_lib.verify import records
from pipeline_lib.verify.axis_table import AXIS_TABLE, Axis
from tests.conftest import REPO

CONFIG_DOC = REPO / "docs" / "config.md"
NAMES = [axis.name for axis in AXIS_TABLE]


def schema_disagreements(schema: dict, table: tuple[Axis, ...]) -> list[str]:
    """Where the config schema's entry of an axis differs from its declaration."""
    props, found = schema["properties"], []
    for axis in table:
        entry = props.get(axis.name)
        if entry is None:
            found.append(f"{axis.name}: no schema entry")
            continue
        if entry.get("items", {}).get("enum") != list(axis.values):
            found.append(f"{axis.name}: enum {entry.get('items')} != {list(axis.values)}")
        if entry.get("default") != [axis.default]:
            found.append(f"{axis.name}: default {entry.get('default')} != [{axis.default}]")
        if " ".join(entry.get("description", "").split()) != axis.doc:
            found.append(f"{axis.name}: description is not the axis's doc line")
        *parents, old = (axis.old_key or "").split(".")
        node = props
        for parent in parents:
            node = node.get(parent, {}).get("properties", {})
        if axis.old_key and old in node:
            found.append(f"{axis.name}: its old key {axis.old_key} is still in the schema")
    return found


def value_table(text: str) -> dict[str, list[str]]:
    """docs/config.md's table of what the jobs do for each value: axis -> the values it lists."""
    body = text.split("What the save and load jobs do for each value:", 1)[1]
    rows = re.findall(r"^\|\s*(`\w+`)?\s*\|([^|]*)\|", body.split("\n\n", 2)[1], flags=re.M)
    listed, axis = {}, None
    for name, values in rows:
        axis = name.strip("`") or axis
        listed.setdefault(axis, []).extend(re.findall(r"`([^`]+)`", values))
    return listed


def docs_disagreements(text: str, table: tuple[Axis, ...]) -> list[str]:
    found = []
    generated = doc_tables.with_table(text, "axes-table", axes.docs_table())
    if generated != text:
        found.append("the axes table is not the one axes-table writes")
    listed = value_table(text)
    for axis in table:
        if sorted(listed.get(axis.name, [])) != sorted(axis.values):
            found.append(f"{axis.name}: values {listed.get(axis.name)} != {list(axis.values)}")
    found += [f"{name}: not an axis" for name in listed if name not in NAMES]
    return found


def test_variant_columns_keys_and_defaults_come_from_the_declaration(small_config):
    fields = dataclasses.fields(axes.Variant)
    assert [(f.name, f.default) for f in fields] == [(a.name, a.default) for a in AXIS_TABLE]
    assert {axis.name: axis.values for axis in AXIS_TABLE} == axes.AXES
    assert records.AXIS_COLUMNS == NAMES
    assert records.CELL_KEYS[-len(NAMES) :] == NAMES
    for schema in (records.MATRIX_SCHEMA, records.TENSORS_SCHEMA):
        assert set(NAMES) <= set(schema.names)
    assert set(NAMES) <= set(expectations.GRID_KEYS)
    cfg = config.validate(small_config)
    assert {name: cfg[name] for name in NAMES} == {a.name: [a.default] for a in AXIS_TABLE}
    assert axes.axis_values(cfg) == {a.name: [a.default] for a in AXIS_TABLE}


def test_the_config_schema_agrees_with_the_declaration():
    assert schema_disagreements(load_schema(), AXIS_TABLE) == []


def test_a_schema_that_differs_from_the_declaration_is_named():
    schema = load_schema()
    schema["properties"]["mode"]["items"]["enum"].remove("full")
    schema["properties"]["modes"] = {}
    del schema["properties"]["frozen_params"]
    extra = Axis("checkpoint_every", ("1", "2"), "how often")
    found = schema_disagreements(schema, (*AXIS_TABLE, extra))
    assert [line.split(":")[0] for line in found] == [
        "mode", "mode", "frozen_params", "checkpoint_every",
    ]  # fmt: skip


def test_the_docs_tables_agree_with_the_declaration():
    assert docs_disagreements(CONFIG_DOC.read_text(), AXIS_TABLE) == []


def test_docs_that_differ_from_the_declaration_are_named():
    text = CONFIG_DOC.read_text()
    generated = "| `param_dtype` | `float32`, `bfloat16` | the parameters'"
    by_value = "| `param_dtype` | `float32`, `bfloat16` | parameter (and"
    assert generated in text and by_value in text
    stale = text.replace(generated, "| `param_dtype` | `float32` | the parameters'")
    assert docs_disagreements(stale, AXIS_TABLE) == [
        "the axes table is not the one axes-table writes"
    ]
    stale = text.replace(by_value, "| `param_dtype` | `float32` | parameter (and")
    assert docs_disagreements(stale, AXIS_TABLE) == [
        "param_dtype: values ['float32'] != ['float32', 'bfloat16']"
    ]
    extra = Axis("checkpoint_every", ("1", "2"), "how often")
    assert "checkpoint_every: values None != ['1', '2']" in docs_disagreements(
        text, (*AXIS_TABLE, extra)
    )


@pytest.mark.parametrize("axis", [a for a in AXIS_TABLE if a.old_key], ids=lambda a: a.old_key)
def test_an_old_key_is_refused_in_one_line_naming_the_new_one(small_config, axis, tmp_path):
    given = copy.deepcopy(small_config)
    *parents, key = axis.old_key.split(".")
    node = given
    for parent in parents:
        node = node.setdefault(parent, {})
    node[key] = [axis.default]
    with pytest.raises(config.ConfigError) as err:
        config.validate(given)
    line = f"config: {axis.old_key}: renamed to {axis.name}, a list"
    assert [e[: len(line)] for e in config.error_lines(err.value)] == [line]
    grid = {"run": "r", "models": ["mlp"], "layouts": {"s": {"framework": "single", "mesh": [1]}}}
    grid_node = grid
    for parent in parents:
        grid_node = grid_node.setdefault(parent, {})
    grid_node[key] = [axis.default]
    with pytest.raises(expectations.ExpectationsError, match=rf"^g\.{axis.old_key}: renamed to "):
        expectations.MeasuredGrid.parse(grid, "g")
