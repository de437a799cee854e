"""Save sequences (axis save_sequence): a saver that saves twice in one run with
one checkpointer object (sync, thread, process), every checkpoint checked against the saver's
state at its own step, consecutive checkpoints required to differ where training changed the
state; cells load the last or the first checkpoint. A checkpointer that writes stale or future
state fails the cell naming the entry and the step."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pipeline_lib.job import sequence_steps
from pipeline_lib.plan import config, grid
from pipeline_lib.plan.axes import Variant
from pipeline_lib.plan.specs import CheckpointPaths
from pipeline_lib.verify import faults, records
from pipeline_lib.verify.results import EntryComparison, LoadRecord, LoadResult, SaveResult
from tests.jobs import cli
from tests.record_schemas import read_checked

LAST, FIRST = Variant(save_sequence="load_last"), Variant(save_sequence="load_first")
TRAIN = {"steps": 2, "resume_steps": 2}
# FSDP2 saves, DDP loads: the sequence under a sharded layout, loaded under a replicated one.
GRID = {
    "models": ["mlp", "mlp_uneven"],
    "layouts": {
        "fsdp2_2": {"framework": "fsdp2", "mesh": [2]},
        "ddp_2": {"framework": "ddp", "mesh": [2]},
    },
    "pairs": [["fsdp2_2", "ddp_2"]],
    "train": TRAIN,
    "run": {"cell_timeout_s": 120},
    "async_save": ["sync", "thread", "process"],
    "save_sequence": ["load_last", "load_first"],
}
# The faulty items of the grid (mlp_uneven): (async_save, save_sequence) -> fault.
FAULTY = {("thread", "load_last"): "stale_save", ("process", "load_first"): "future_save"}
FIRST_ENTRY = "model.blocks.0.fc1.bias"


# --- pure ----------------------------------------------------------------------------------
def test_once_is_the_default_and_keeps_every_id_and_path():
    assert Variant(save_sequence="once").id == "" and Variant().save_sequence == "once"
    assert LAST.id == "save_sequence-load_last" and FIRST.id == "save_sequence-load_first"
    assert grid.job_root(None, LAST) == "results/axes/save_sequence-load_last"
    assert not Variant().saves_sequence and LAST.saves_sequence


@pytest.mark.parametrize(
    ("variant", "reason"),
    [
        (replace(LAST, mode="full"), "save_sequence load_last is tested with mode sharded only"),
        (replace(FIRST, format="safetensors"), "is tested with format dcp only (format safet"),
        (replace(LAST, load_process="saver"), "with load_process fresh only"),
        (replace(LAST, load_mode="full"), "with load_mode same only"),
    ],
)
def test_what_a_sequence_does_not_combine_with_is_skip(variant, reason):
    layout = grid.Layout("x", "fsdp2", (2,), ("shard",), None)
    assert reason in grid.skip_reason(variant, "save", layout)


def test_an_existing_checkpoint_is_not_a_sequence():
    assert grid.existing_conflict(LAST) == "save_sequence load_last"
    assert grid.existing_conflict(Variant()) is None


def test_steps_and_folders_of_a_sequence():
    assert sequence_steps.save_steps({"steps": 3, "resume_steps": 2}) == [3, 5]
    paths = CheckpointPaths("r/checkpoint", "r/full_state.pt", "r/reference")
    last = sequence_steps.paths_by_step(LAST, paths, TRAIN)
    assert last[4] == paths  # the loaded one where a single save writes: the load jobs read it
    assert last[2] == CheckpointPaths(
        "r/checkpoint-step-2", "r/full_state-step-2.pt", "r/reference-step-2"
    )
    first = sequence_steps.paths_by_step(FIRST, paths, TRAIN)
    assert first[2] == paths and first[4].checkpoint == "r/checkpoint-step-4"


def test_the_loader_resumes_from_the_step_it_loaded():
    from pipeline_lib.job.training import Item
    from tests.test_records import SPEC

    item = Item(replace(SPEC, variant=LAST, train={**TRAIN, "lr": 0.1}), model_module=None)
    loaded = sequence_steps.as_loaded(item)
    assert loaded.train == {"steps": 4, "resume_steps": 2, "lr": 0.1}
    assert loaded.spec.train is loaded.train  # one item: what it runs is its spec's
    assert item.train["steps"] == 2  # the item's own settings are left as they were
    assert sequence_steps.as_loaded(item.changed(variant=FIRST)).train["steps"] == 2
    flat = item.in_mode("flattened_optim")  # an existing checkpoint's mode: the spec's too
    assert flat.variant is flat.spec.variant and flat.variant.mode == "flattened_optim"
    assert item.variant.mode == "sharded"


def test_an_entry_the_saver_changed_must_differ_between_consecutive_checkpoints():
    changed = {"model.a": True, "model.b": True, "optim.param_groups.0.lr": False}
    same = {"model.a": False, "model.b": True, "optim.param_groups.0.lr": True}
    entries = sequence_steps.unchanged(changed, same, (2, 4))
    assert [n for n, e in entries.items() if not e.equal] == ["model.b"]
    note = entries["model.b"].note
    assert note == "equal in the checkpoints of steps 2 and 4, though the saver's state changed"
    assert all(
        e.equal
        for e in sequence_steps.unchanged(changed, dict.fromkeys(same, False), (2, 4)).values()
    )


def test_the_verdict_names_each_checkpoint_by_its_step():
    ok = EntryComparison(True, 0.0)
    bad = EntryComparison(False, 0.5, "bytes differ")
    stuck = sequence_steps.unchanged({"model.a": True}, {"model.a": True}, (2, 4))
    checks = [
        sequence_steps.sequence_check("state dict vs live at step 2", {"model.a": ok}),
        sequence_steps.sequence_check("files vs saver at step 2", {"model.a": ok}),
        sequence_steps.sequence_check(sequence_steps.CONSECUTIVE, stuck),
    ]
    save = SaveResult(
        status="ok", reason="", state_check={"model.a": ok}, files_check={"model.a": bad},
        files_error="", resume_losses=[1.0], save_step=4, sequence=checks,
    )  # fmt: skip
    load = LoadResult(status="ok", reason="", entries={"model.a": ok}, resume_losses=[1.0])
    status, reason = records.verdict(save, load, 1e-5)
    assert status == "fail"
    assert reason == (
        "files vs saver at step 4: 1 of 1 entries differ; first model.a: bytes differ "
        "(max_abs_diff 0.5); save sequence: 1 of 1 entries differ; first model.a: equal in the "
        "checkpoints of steps 2 and 4, though the saver's state changed"
    )
    checks[1] = sequence_steps.sequence_check("files vs saver at step 2", {}, "cannot read")
    assert "; cannot read; " in records.verdict(replace(save, sequence=checks), load, 1e-5)[1]


def test_save_step_is_the_loaded_checkpoints_step():
    from tests.test_records import SPEC, cell_row, import_record, load_result, save_record

    spec = replace(SPEC, train=TRAIN, variant=LAST)
    assert cell_row(save_record(save_step=4), load_result(), spec)["save_step"] == 4
    once = replace(spec, variant=Variant())
    assert cell_row(save_record(), load_result(), once)["save_step"] == 2
    assert cell_row(import_record(), load_result(), once)["save_step"] is None


def test_the_report_counts_a_check_named_with_its_step():
    from pipeline_lib.results.report import findings
    from tests.test_report import CONFIG, results_tables

    matrix, tensors = (t.to_pandas() for t in results_tables())
    stale = "files vs saver at step 4: 1 of 2 entries differ; first model.w: bytes differ; "
    stale += "save sequence: 1 of 2 entries differ; first model.w: equal in the checkpoints"
    matrix.loc[matrix.status == "fail", "reason"] = stale
    found = findings(matrix, tensors, CONFIG)
    assert (matrix.status == "fail").sum() == 2
    assert "Check files vs saver finds a difference in 2 cells" in found
    assert "Check save sequence finds a difference in 2 cells" in found


def test_sequence_faults_run_in_the_campaign_in_a_sequence():
    cfg = config.validate({**GRID, "faults": [{"fault": "all", "model": "mlp", "save": "fsdp2_2",
                                               "load": "ddp_2"}]})  # fmt: skip
    for fault in ("stale_save", "future_save"):
        assert faults.FAULTS[fault].stage == "sequence"
        cell = grid.fault_cell(cfg, f"{fault}.mlp.fsdp2_2.ddp_2")
        (saved,) = grid.fault_save_spec(cfg, cell).items
        assert saved.fault == fault and saved.variant.save_sequence == "load_last"
        assert saved.paths.checkpoint == f"{cell.root}/save/mlp/fsdp2_2/checkpoint"
        (loads,) = grid.fault_load_spec(cfg, cell).items
        assert loads.variant == saved.variant and loads.sources[0].fault is None
    assert grid.fault_variant("stale_save").async_save == "thread"
    assert grid.fault_variant("future_save").async_save == "process"
    assert grid.fault_variant("flip_byte") == Variant()


# --- torchrun ------------------------------------------------------------------------------
def run_sequences() -> dict[tuple[str, str], dict]:
    """The grid's one save job (its mlp_uneven items with the FAULTY faults) and one load job:
    {(variant id, model): row}."""
    cfg = config.validate(GRID)
    (save_job,) = grid.save_jobs(cfg)
    spec = grid.save_job_spec(cfg, *save_job)
    items = tuple(replace(i, fault=_fault(i.variant, i.model), skip=_skip(i)) for i in spec.items)
    cli("save", replace(spec, items=items))
    (load_job,) = grid.load_jobs(cfg)
    loads = grid.load_job_spec(cfg, *load_job)
    cli("load", replace(loads, items=tuple(replace(i, skip=_skip(i)) for i in loads.items)))
    records_ = grid.load_outputs(cfg, *load_job)
    rows = {}
    for (variant, model), record in zip(grid.items(cfg), records_, strict=True):
        (row,) = read_checked(record, LoadRecord).cells
        rows[variant.id, model] = row
    return rows


def _skip(item) -> str | None:
    """The mlp_uneven items run only with a fault (the test's time)."""
    if item.model == "mlp_uneven" and _fault(item.variant, item.model) is None:
        return "not run by this test"
    return None


def _fault(variant: Variant, model: str) -> str | None:
    if model != "mlp_uneven":
        return None
    return FAULTY.get((variant.async_save, variant.save_sequence))


@pytest.mark.torchrun
def test_sequences_of_every_checkpointer_pass_and_stale_or_future_saves_fail(in_tmp):
    rows = run_sequences()
    for async_save in ("sync", "thread", "process"):
        for sequence, step in (("load_last", 4), ("load_first", 2)):
            variant = Variant(async_save=async_save, save_sequence=sequence)
            row = rows[variant.id, "mlp"]
            assert (row["status"], row["reason"]) == ("pass", ""), (variant.id, row["reason"])
            assert row["save_step"] == step and row["save_sequence"] == sequence
            assert row["entries_checked"] > 10 and row["resume_max_rel_diff"] is not None
    stale = rows[Variant(async_save="thread", save_sequence="load_last").id, "mlp_uneven"]
    assert stale["status"] == "fail", stale["reason"]
    # The last checkpoint holds the first one's state: check 1 at its step and the
    # consecutive-checkpoints check name the entry and the steps.
    assert stale["reason"].startswith("files vs saver at step 4: "), stale["reason"]
    assert f"first {FIRST_ENTRY}: bytes differ" in stale["reason"]
    assert (
        f"save sequence: 40 of 52 entries differ; first {FIRST_ENTRY}: equal in the checkpoints "
        "of steps 2 and 4, though the saver's state changed"
    ) in stale["reason"], stale["reason"]
    future = rows[Variant(async_save="process", save_sequence="load_first").id, "mlp_uneven"]
    assert future["status"] == "fail", future["reason"]
    # The first checkpoint holds the state after the next update: check 1 at its step.
    assert future["reason"].startswith("files vs saver at step 2: "), future["reason"]
    assert f"first {FIRST_ENTRY}: bytes differ" in future["reason"]
