"""Verdicts and rows: pure logic, every status and every reason; rows -> Parquet."""

import math
from dataclasses import fields, replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline_lib.common.atomic import write_json
from pipeline_lib.common.layout import Layout
from pipeline_lib.plan.axes import Variant
from pipeline_lib.plan.specs import ItemSpec
from pipeline_lib.results.aggregate import TOKEN_KEY, aggregate
from pipeline_lib.verify import records
from pipeline_lib.verify.results import (
    EntryComparison,
    EntryInfo,
    Env,
    ImportRecord,
    LoadResult,
    SaveRecord,
    Timing,
)

LAYOUT_A = Layout("a", "ddp", (2,), ("dp",), None)
LAYOUT_B = Layout("b", "hsdp", (2, 2), ("replicate", "shard"), None)
VARIANT = Variant()
SPEC = ItemSpec(
    kind="load",
    id="0",
    model="mlp",
    layout=LAYOUT_B,
    variant=VARIANT,
    skip=None,
    train={},
    run={},
    config_hash="abc",
    record="r.json",
    verify={"resume_rtol": 1e-5, "resume_rtol_bfloat16": 1e-3},
)
LOAD_TORCH = "2.13.0"
ENV = Env("2.13.0", "3.11.7", "gloo", "cpu", "host", 1, "exec")


def ok(equal=True) -> EntryComparison:
    return EntryComparison(equal, 0.0 if equal else 0.5, "" if equal else "bytes differ")


def save_record(**overrides) -> SaveRecord:
    record = {
        "status": "ok", "reason": "", "layout": LAYOUT_A, "files_error": "",
        "state_check": {"model.w": ok(), "optim.state.w.step": ok()},
        "files_check": {"model.w": ok(), "optim.state.w.step": ok()},
        "entries": {"model.w": EntryInfo("param", "float32", [2, 2]),
                    "optim.state.w.step": EntryInfo("optim.step", "float32", [])},
        "resume_losses": [1.0, 0.5], "timing": Timing(save_s=0.1), "checkpoint_bytes": 10,
        "checkpoint_files": 3, "env": ENV,
        "model": "mlp", "checkpoint": "c", "reference": "r", "config_hash": "abc",
        "created_at": "2026-01-01T00:00:00Z", "torch_version": "2.13.0",
    }  # fmt: skip
    record.update(overrides)
    return SaveRecord(**record)


def load_result(**overrides) -> LoadResult:
    result = {
        "status": "ok", "reason": "",
        "entries": {"model.w": ok(), "optim.state.w.step": ok()},
        "resume_losses": [1.0, 0.5], "timing": Timing(load_s=0.2, verify_s=0.01),
    }  # fmt: skip
    result.update(overrides)
    return LoadResult(**result)


def import_record(**overrides) -> ImportRecord:
    """An existing checkpoint's import record (its save side)."""
    saved = save_record()
    facts = {f.name: getattr(saved, f.name) for f in fields(SaveRecord)}
    return ImportRecord(**{**facts, "source_folder": "/x", **overrides})


def cell_row(save, load, spec=SPEC):
    return records.cell_row("mlp", save, load, spec, LOAD_TORCH)


def tensor_rows(save, load):
    return records.tensor_rows("mlp", save, load, SPEC, LOAD_TORCH)


def verdict(save=None, load=None):
    return records.verdict(save or save_record(), load or load_result(), 1e-5)


def test_pass():
    assert verdict() == ("pass", "")


def test_files_mismatch_fails_and_names_first_entry():
    save = save_record(files_check={"model.w": ok(False), "optim.state.w.step": ok()})
    status, reason = verdict(save=save)
    assert status == "fail"
    assert (
        reason
        == "files vs saver: 1 of 2 entries differ; first model.w: bytes differ (max_abs_diff 0.5)"
    )


def test_unreadable_checkpoint_fails_even_if_load_errors():
    save = save_record(
        files_check={},
        files_error="files vs saver: cannot read checkpoint x: FileNotFoundError: .metadata",
    )
    status, reason = verdict(
        save=save, load=load_result(status="error", reason="CheckpointException: boom")
    )
    assert status == "fail"
    assert "cannot read checkpoint" in reason and "load error: CheckpointException: boom" in reason


def test_loader_mismatch_counts_entries():
    entries = {"model.w": EntryComparison(False, None, "missing in the loader's state"),
               "optim.state.w.step": ok(False)}  # fmt: skip
    status, reason = verdict(load=load_result(entries=entries))
    assert status == "fail"
    assert reason.startswith(
        "loader vs saver: 2 of 2 entries differ; first model.w: missing in the loader's state"
    )


def test_resume_difference_above_rtol_fails():
    status, reason = verdict(load=load_result(resume_losses=[1.0, 0.51]))
    assert status == "fail"
    assert (
        reason
        == "resume: loss differs by 0.02 (relative) at resume step 1, above resume_rtol 1e-05"
    )


def test_resume_nan_fails():
    assert verdict(load=load_result(resume_losses=[1.0, math.nan]))[0] == "fail"


def test_resume_within_rtol_passes():
    assert verdict(load=load_result(resume_losses=[1.0, 0.5 * (1 + 1e-6)]))[0] == "pass"


@pytest.mark.parametrize("status", ["error", "crash", "timeout"])
def test_job_failures_keep_their_status(status):
    assert verdict(save=save_record(status=status, reason="rank 1 killed by SIGKILL during save")) == (
        status, "save: rank 1 killed by SIGKILL during save",
    )  # fmt: skip
    assert verdict(load=load_result(status=status, reason="x")) == (status, "load: x")


def test_a_state_dict_that_differs_from_the_live_state_fails_first():
    shared = EntryComparison(
        False, None, "shares storage with optim.state.w.exp_avg_sq, which the model does not tie"
    )
    save = save_record(state_check={"model.w": ok(), "optim.state.w.exp_avg": shared},
                       files_check={"model.w": ok(False), "optim.state.w.step": ok()})  # fmt: skip
    status, reason = verdict(save=save)
    assert status == "fail"
    assert reason.startswith(
        "state dict vs live: 1 of 2 entries differ; first optim.state.w.exp_avg: shares storage "
        "with optim.state.w.exp_avg_sq, which the model does not tie; files vs saver: 1 of 2"
    )
    row = cell_row(save, load_result())
    assert (row["state_entries_mismatched"], row["entries_mismatched"]) == (1, 2)
    assert row["entries_checked"] == 3
    rows = {r["entry"]: r for r in tensor_rows(save, load_result())}
    exp_avg = rows["optim.state.w.exp_avg"]
    assert (exp_avg["equal"], exp_avg["state_equal"], exp_avg["file_equal"]) == (False, False, None)
    assert exp_avg["note"].startswith("state: shares storage with optim.state.w.exp_avg_sq")
    assert rows["optim.state.w.step"]["state_equal"] is None  # the state check did not see it


def test_skip_wins():
    assert verdict(save=save_record(status="skip", reason="TP degree 2 does not divide hidden=25")) == (
        "skip", "save layout: TP degree 2 does not divide hidden=25",
    )  # fmt: skip
    assert verdict(load=load_result(status="skip", reason="r"))[0] == "skip"


def test_cell_row_matches_schema_and_counts():
    save = save_record(files_check={"model.w": ok(False), "optim.state.w.step": ok()})
    row = cell_row(save, load_result(entries={"model.w": ok(False), "optim.state.w.step": ok()}))
    table = pa.Table.from_pylist([row], schema=records.MATRIX_SCHEMA)
    assert table.num_rows == 1
    assert set(row) == set(records.MATRIX_SCHEMA.names)
    assert row["entries_checked"] == 2 and row["entries_mismatched"] == 1
    assert row["files_entries_mismatched"] == 1 and row["load_entries_mismatched"] == 1
    assert row["save_mesh"] == "2" and row["load_mesh"] == "2x2"
    assert row["max_abs_diff"] == 0.5 and row["status"] == "fail"


def test_failed_cell_row_has_no_check_columns():
    row = cell_row(save_record(status="crash", reason="r"), load_result(status="not_run"))
    assert row["status"] == "crash" and row["entries_checked"] == 2


def test_tensor_rows():
    save = save_record(files_check={"model.w": ok(False), "optim.state.w.step": ok()})
    rows = tensor_rows(save, load_result())
    table = pa.Table.from_pylist(rows, schema=records.TENSORS_SCHEMA)
    assert table.num_rows == 2
    w = next(r for r in rows if r["entry"] == "model.w")
    assert (w["kind"], w["equal"], w["state_equal"], w["file_equal"], w["load_equal"]) == (
        "param",
        False,
        True,
        False,
        True,
    )
    assert w["note"] == "files: bytes differ" and w["shape"] == [2, 2]


def test_tensor_rows_of_a_cell_whose_load_never_ran_are_not_equal_or_unequal():
    rows = tensor_rows(save_record(), load_result(status="skip", entries={}))
    assert [r["equal"] for r in rows] == [None, None]
    assert [r["file_equal"] for r in rows] == [True, True]


DROPPED = ["model.a.bias"]


def test_strict_load_must_fail_naming_the_missing_entry():
    save = save_record(dropped_entries=DROPPED)
    named = "CheckpointException: Missing key in checkpoint state_dict: model.a.bias."
    assert records.verdict(save, load_result(strict_error=named), 1e-5, "strict") == ("pass", "")
    status, reason = records.verdict(save, load_result(), 1e-5, "strict")
    assert status == "fail"
    assert reason == "strict load: a checkpoint without model.a.bias loaded without an error"
    status, reason = records.verdict(save, load_result(strict_error="Boom"), 1e-5, "strict")
    assert (status, reason) == (
        "fail", "strict load: failed without naming the missing entry model.a.bias: Boom",
    )  # fmt: skip


def test_non_strict_load_must_report_exactly_the_missing_entry():
    save = save_record(dropped_entries=DROPPED)
    # The resumed losses differ by design (the entry kept the loader's init): not a failure.
    load = load_result(missing_entries=DROPPED, resume_losses=[2.0, 1.0])
    assert records.verdict(save, load, 1e-5, "non_strict") == ("pass", "")
    status, reason = records.verdict(save, load_result(missing_entries=[]), 1e-5, "non_strict")
    assert status == "fail"
    assert reason == "non-strict load: reported missing [], the saver left out [model.a.bias]"
    row = cell_row(save, load, replace(SPEC, variant=Variant(mode="non_strict")))
    assert row["missing_entries"] == "model.a.bias" and row["resume_max_rel_diff"] is None
    assert row["mode"] == "non_strict" and row["format"] == "dcp"


def test_a_saved_frozen_parameter_fails_the_cell():
    status, reason = verdict(save=save_record(frozen_saved=["model.a.weight"]))
    assert status == "fail"
    assert reason == (
        "ignore_frozen_params: the saver's state holds 1 frozen parameter(s); first model.a.weight"
    )


def test_aggregate_writes_the_rows_of_every_record(tmp_path):
    """pyarrow reads the records as from_pylist would build them: every value, NaN and missing
    keys included, in record order; keys outside the schemas are ignored."""
    nan_resume = load_result(resume_losses=[1.0, math.nan])
    not_run = load_result(status="not_run", reason="the save job failed", entries={})
    cells = [
        (save_record(files_check={"model.w": ok(False), "optim.state.w.step": ok()}), nan_resume),
        (save_record(status="crash", reason="r", files_check={}, entries={}), not_run),
    ]
    first = {
        "cells": [cell_row(save, load) for save, load in cells],
        "tensors": [r for s, ld in cells for r in tensor_rows(s, ld)],
        "launches": 2,
        "fault": {"kind": "kill"},
    }
    # A record of an older layout: keys the schemas have since gained are missing.
    second = {"cells": [{"model": "old", "status": "pass"}], "tensors": []}
    paths = [str(tmp_path / "first.json"), str(tmp_path / "second.json")]
    for path, record in zip(paths, (first, second), strict=True):
        write_json(path, record)  # indented, NaN written as NaN, as the load jobs write it
    matrix_path, tensors_path = tmp_path / "matrix.parquet", tmp_path / "tensors.parquet"
    aggregate(paths, str(matrix_path), str(tensors_path), git_commit="abc123")

    expected_cells = [
        {**row, "git_commit": "abc123"} for row in [*first["cells"], *second["cells"]]
    ]
    for path, expected, schema in (
        (matrix_path, expected_cells, records.MATRIX_SCHEMA),
        (tensors_path, first["tensors"], records.TENSORS_SCHEMA),
    ):
        # The file from_pylist + write_table makes of the same rows, read back the same way.
        expected_path = tmp_path / f"expected-{path.name}"
        pq.write_table(pa.Table.from_pylist(expected, schema=schema), expected_path)
        table, expected_table = pq.read_table(path), pq.read_table(expected_path)
        # The aggregate run's token (matrix and tensors from one run) is the only extra key.
        metadata = dict(table.schema.metadata)
        assert len(metadata.pop(TOKEN_KEY)) == 32
        table = table.replace_schema_metadata(metadata)
        assert table.schema.equals(expected_table.schema, check_metadata=True)
        # repr: NaN == NaN there (the first cell's resume_max_rel_diff is NaN).
        assert repr(table.to_pylist()) == repr(expected_table.to_pylist())
    assert math.isnan(first["cells"][0]["resume_max_rel_diff"])
