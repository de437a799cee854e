"""Existing checkpoints (config key ``checkpoints``): names mapped by a naming (pure), config
errors, and a checkpoint written in torchtitan's layout with plain torch (no save job of this
tool) run through the grid: its files are the reference, every load layout must match them bit
for bit and agree with the others on the resumed losses; broken on purpose, the cells fail."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline_lib.plan import config, grid
from pipeline_lib.plan.config import ConfigError
from pipeline_lib.verify import checkpoint_names
from pipeline_lib.verify.results import ImportRecord, LoadRecord
from tests import procs
from tests.conftest import REPO
from tests.jobs import cli
from tests.outside import write_checkpoints as writer
from tests.record_schemas import checked, read_checked

TITAN = checkpoint_names.Naming("torchtitan")


def test_torchtitan_names_map_to_ours():
    assert TITAN.ours("layers.0.attention.wq.weight") == "model.layers.0.attention.wq.weight"
    assert TITAN.ours("optimizer.state.head.weight.exp_avg") == "optim.state.head.weight.exp_avg"
    assert (
        TITAN.ours("optimizer.param_groups.head.weight.lr") == "optim.param_groups.head.weight.lr"
    )
    assert TITAN.ours("lr_scheduler.last_epoch") == "scheduler.last_epoch"
    # One object entry each, as DCP up to torch 2.3 wrote a dict without tensors.
    assert TITAN.ours("lr_scheduler") == "scheduler"
    assert TITAN.ours("dataloader") is None and TITAN.ours("train_state") is None
    assert TITAN.ours("dataloader.dp_rank_0") is None and TITAN.ours("train_state.step") is None
    assert checkpoint_names.Naming("dcp_matrix").ours("model.w") == "model.w"


def test_placement_sorts_entries_and_tells_the_optimizer_layout():
    places = checkpoint_names.place(
        ["w", "extra", "optimizer.param_groups.w.lr", "train_state.step"], TITAN, {"model.w"}
    )
    assert places.ours == {"w": "model.w", "optimizer.param_groups.w.lr": "optim.param_groups.w.lr"}
    assert places.excluded == ("train_state.step",) and places.unplaced == ("extra",)
    assert places.flattened_optim
    nested = checkpoint_names.place(
        ["model.w", "optim.param_groups.0.lr"], checkpoint_names.Naming("dcp_matrix")
    )
    assert not nested.flattened_optim
    stray = checkpoint_names.place(["other.x"], checkpoint_names.Naming("dcp_matrix"))
    assert stray.unplaced == ("other.x",)
    objects = checkpoint_names.place(["lr_scheduler", "dataloader", "w"], TITAN, {"model.w"})
    assert objects.ours == {"lr_scheduler": "scheduler", "w": "model.w"}
    assert objects.excluded == ("dataloader",)


# A model of yours runs inside models._user.UserModel: this tool names its entries so.
WRAPPED = {"model.user_model.blocks.0.w", "model.user_model.head.w"}


def test_every_parameter_name_of_a_wrapped_model_gets_the_wrapper():
    """The model's, the optimizer state's and the per-parameter param groups' names alike;
    a param group by index keeps its index and lists its parameters under our names."""
    entries = [
        "blocks.0.w", "head.w", "optimizer.state.blocks.0.w.exp_avg",
        "optimizer.param_groups.head.w.lr", "optimizer.param_groups.0.lr", "lr_scheduler",
    ]  # fmt: skip
    places = checkpoint_names.place(entries, TITAN, WRAPPED, wrapper="user_model.")
    assert places.ours == {
        "blocks.0.w": "model.user_model.blocks.0.w",
        "head.w": "model.user_model.head.w",
        "optimizer.state.blocks.0.w.exp_avg": "optim.state.user_model.blocks.0.w.exp_avg",
        "optimizer.param_groups.head.w.lr": "optim.param_groups.user_model.head.w.lr",
        "optimizer.param_groups.0.lr": "optim.param_groups.0.lr",
        "lr_scheduler": "scheduler",
    }
    assert places.unplaced == ()
    listed = places.value("optim.param_groups.0.params", ["blocks.0.w", "head.w"])
    assert listed == ["user_model.blocks.0.w", "user_model.head.w"]
    assert places.value("optim.param_groups.0.lr", 0.1) == 0.1


def test_names_that_carry_the_wrapper_already_are_taken_as_they_are():
    """This tool's own checkpoint of a model of yours (naming dcp_matrix)."""
    mine = ["model.user_model.blocks.0.w", "model.user_model.head.w"]
    state = ["optim.state.user_model.head.w.step", "optim.param_groups.0.params"]
    places = checkpoint_names.place(
        mine + state, checkpoint_names.Naming("dcp_matrix"), WRAPPED, "user_model."
    )
    assert places.ours == {name: name for name in mine + state}
    listed = places.value("optim.param_groups.0.params", ["user_model.head.w"])
    assert listed == ["user_model.head.w"]


def test_the_parameters_a_param_group_lists_map_as_their_optimizer_state_does():
    """A naming of yours that renames parameters (a trainer that saved its DDP module's
    names): a listed parameter maps as its state entries do; one without state keeps its
    name (under the wrapper)."""
    entries = ["net.module.head.w", "opt.state.module.head.w.exp_avg", "opt.param_groups.0.params"]

    def ours(entry: str) -> str:
        head, _, rest = entry.partition(".")
        return {"net": "model.", "opt": "optim."}[head] + rest.replace("module.", "", 1)

    class Mine(checkpoint_names.Naming):
        def ours(self, entry):
            return ours(entry)

    places = checkpoint_names.place(entries, Mine("mine"), WRAPPED, "user_model.")
    assert places.ours["opt.state.module.head.w.exp_avg"] == "optim.state.user_model.head.w.exp_avg"
    listed = places.value("optim.param_groups.0.params", ["module.head.w", "blocks.0.w"])
    assert listed == ["user_model.head.w", "user_model.blocks.0.w"]


def _config(path: str, **entry) -> dict:
    return {
        "models": ["transformer"],
        "layouts": {
            "single": {"framework": "single", "mesh": [1]},
            "fsdp2_2": {"framework": "fsdp2", "mesh": [2]},
            "tp_2": {"framework": "tp", "mesh": [2]},
        },
        "pairs": "none",
        "checkpoints": {
            "titan": {"path": path, "model": "transformer", "naming": "torchtitan", **entry}
        },
    }


def test_config_names_the_field_of_a_bad_checkpoint(tmp_path):
    with pytest.raises(ConfigError) as info:
        config.validate(_config(str(tmp_path), model="mlp", naming="nope"))
    message = str(info.value)
    assert "checkpoints.titan.path: " in message and "no .metadata in it" in message
    assert "checkpoints.titan.model: 'mlp' is not one of models" in message
    assert "checkpoints.titan.naming: unknown naming 'nope'" in message
    (tmp_path / ".metadata").write_bytes(b"")
    raw = _config(str(tmp_path))
    raw["checkpoints"]["single"] = raw["checkpoints"].pop("titan")
    with pytest.raises(ConfigError, match=r"checkpoints\.single: a layout has this name too"):
        config.validate(raw)
    with pytest.raises(ConfigError, match="pairs: none saves nothing"):
        config.validate({**_config(str(tmp_path)), "checkpoints": {}})


def write_torchtitan_checkpoint(path: Path, extra: bool = False) -> None:
    """A checkpoint as torchtitan's CheckpointManager lays it out, written with plain torch
    (examples/write_torchtitan_checkpoint.py, as README runs it)."""
    command = [sys.executable, str(REPO / "examples/write_torchtitan_checkpoint.py"), str(path)]
    proc = procs.run(
        command + (["--extra-entry", "extra.weight"] if extra else []),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def run_existing(raw: dict, load_faults: dict | None = None) -> dict[str, dict]:
    """The import job, every load job, then aggregation, through the CLI as Snakemake runs
    them: {load layout: matrix row}."""
    cfg = config.validate(raw)
    for name in cfg["checkpoints"]:
        run_cli("import-checkpoint", "--grid", json.dumps(cfg), "--name", name)
    for _, layout in grid.load_jobs(cfg):
        spec = grid.load_job_spec(cfg, grid.RESULTS, layout)
        fault = (load_faults or {}).get(layout)
        items = tuple(
            replace(i, sources=tuple(replace(s, fault=fault) for s in i.sources))
            for i in spec.items
        )
        cli("load", replace(spec, items=items))
    records = [p for _, layout in grid.load_jobs(cfg) for p in grid.load_outputs(cfg, "results",
                                                                                layout)]  # fmt: skip
    run_cli("aggregate", "--matrix", "m.parquet", "--tensors", "t.parquet", *records)
    return {row["load_layout"]: row for row in pq.read_table("m.parquet").to_pylist()}


def run_cli(*args: str) -> None:
    proc = procs.run(
        [sys.executable, "-m", "pipeline_lib", *args], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.torchrun
def test_a_torchtitan_checkpoint_loads_bit_for_bit_under_every_layout(in_tmp):
    write_torchtitan_checkpoint(in_tmp / "titan")
    rows = run_existing(_config(str(in_tmp / "titan")))
    assert set(rows) == {"single", "fsdp2_2", "tp_2"}
    for layout, row in rows.items():
        assert (row["status"], row["reason"]) == ("pass", ""), layout
        assert row["save_layout"] == "titan" and row["save_framework"] == "existing"
        assert row["source_folder"] == str((in_tmp / "titan").resolve())
        assert len(row["source_metadata_sha256"]) == 64
        assert row["entries_checked"] > 30 and row["resume_max_rel_diff"] <= 1e-5
    entries = {r["entry"] for r in pq.read_table("t.parquet").to_pylist()}
    assert "model.layers.0.attn.wq.weight" in entries or any(".wq." in e for e in entries)
    assert not any(e.startswith(("dataloader", "train_state", "model.dataloader")) for e in entries)
    record = read_checked(grid.existing_record_path("titan"), ImportRecord)
    assert record.excluded_entries == ["dataloader.dp_rank_0", "train_state.step"]


@pytest.mark.torchrun
def test_broken_on_purpose_the_cells_fail_naming_why(in_tmp):
    write_torchtitan_checkpoint(in_tmp / "titan", extra=True)
    raw = _config(str(in_tmp / "titan"))
    raw["layouts"].pop("tp_2")
    rows = run_existing(raw, load_faults={"fsdp2_2": "skip_load"})
    single, skipped = rows["single"], rows["fsdp2_2"]
    # An entry the model does not have: the load cannot place it.
    assert single["status"] == "fail"
    assert "extra.weight: missing in the loader's state" in single["reason"]
    # A load that did not happen: the loader's own init differs from the files.
    assert skipped["status"] == "fail" and "loader vs saver" in skipped["reason"]
    assert skipped["entries_mismatched"] > 10


@pytest.mark.torchrun
def test_resumed_losses_must_agree_across_load_layouts(in_tmp):
    write_torchtitan_checkpoint(in_tmp / "titan")
    rows = run_existing(_config(str(in_tmp / "titan")), load_faults={"tp_2": "skew_resume_lr"})
    assert rows["single"]["status"] == rows["fsdp2_2"]["status"] == "pass"
    assert rows["tp_2"]["status"] == "fail"
    assert "from the median of the 3 load layouts" in rows["tp_2"]["reason"]


def test_a_naming_of_your_own_is_a_function_by_import_path(in_tmp):
    (in_tmp / "my_names.py").write_text(
        "def ours(entry):\n"
        "    if entry.startswith('trainer.'):\n"
        "        return None\n"
        "    return 'model.' + entry.removeprefix('net.')\n"
    )
    mine = checkpoint_names.Naming("my_names:ours")
    assert checkpoint_names.naming_error("my_names:ours") is None
    assert mine.ours("net.w") == "model.w" and mine.ours("trainer.step") is None
    assert "has no callable 'nope'" in checkpoint_names.naming_error("my_names:nope")
    assert "cannot import 'missing_module'" in checkpoint_names.naming_error("missing_module:f")


@pytest.mark.torchrun
def test_a_folder_that_would_run_code_is_an_error_for_its_cells_and_runs_nothing(in_tmp):
    from tests.test_untrusted import tamper

    write_torchtitan_checkpoint(in_tmp / "titan")
    tamper(in_tmp / "titan", in_tmp / "ran")
    raw = _config(str(in_tmp / "titan"))
    raw["layouts"] = {"single": raw["layouts"]["single"]}
    rows = run_existing(raw)
    assert not (in_tmp / "ran").exists()
    assert rows["single"]["status"] == "error"
    assert rows["single"]["reason"].startswith("import: reading ")
    assert "refused to unpickle posix.system" in rows["single"]["reason"]


@pytest.mark.torchrun
def test_a_checkpoint_this_tool_wrote_loads_as_an_existing_one(in_tmp):
    """A model of yours: this tool's own checkpoint of it carries the wrapper's names
    (``model.user_model.…``), taken as they are under naming dcp_matrix."""
    model = "examples.my_model:build"
    # The save job of a grid with one layout; then its checkpoint named in another grid.
    saver = {"models": [model], "layouts": {"ddp_2": {"framework": "ddp", "mesh": [2]}}}
    cfg = config.validate(saver)
    cli("save", grid.save_job_spec(cfg, grid.RESULTS, "ddp_2"))
    path = in_tmp / "kept"
    Path(grid.checkpoint_dir(model, "ddp_2")).rename(path)
    raw = {
        "models": [model],
        "layouts": {"single": {"framework": "single", "mesh": [1]},
                    "fsdp2_2": {"framework": "fsdp2", "mesh": [2]}},
        "pairs": "none",
        "checkpoints": {"kept": {"path": str(path), "model": model}},
    }  # fmt: skip
    rows = run_existing(raw)
    assert {(k, r["status"]) for k, r in rows.items()} == {("single", "pass"), ("fsdp2_2", "pass")}
    record = read_checked(grid.existing_record_path("kept"), ImportRecord)
    assert record.excluded_entries == [] and record.unplaced_entries == []
    assert "optim.state.user_model.head.weight.exp_avg" in record.entries
    assert not any("user_model.user_model" in entry for entry in record.entries)


@pytest.mark.torchrun
def test_an_unchanged_import_is_reused_and_a_changed_checkpoint_is_not(in_tmp, capsys):
    """An import whose inputs did not change (adding a model to the config runs the import
    job again) writes its record again byte for byte and leaves its reference alone; a
    checkpoint rewritten behind its back, or a reference changed, imports again."""
    from pipeline_lib.job.existing import import_checkpoint
    from pipeline_lib.job.reuse import manifest

    write_torchtitan_checkpoint(in_tmp / "titan")
    spec = grid.existing_spec(config.validate(_config(str(in_tmp / "titan"))), "titan")

    def imported() -> tuple[str, str, dict]:
        import_checkpoint(spec)
        line = capsys.readouterr().out.strip().splitlines()[-1]
        return line, Path(spec.record).read_text(), manifest(spec.reference)

    line, record, reference = imported()
    assert "reused 0 of 1 imports" in line
    assert checked(json.loads(record), ImportRecord).status == "ok"
    assert reference
    line, again, kept = imported()
    assert "reused 1 of 1 imports" in line and (again, kept) == (record, reference)

    shard = next((in_tmp / "titan").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes())  # same bytes, a new modification time
    mtime = shard.stat().st_mtime_ns  # a second on: also where mtimes have whole seconds
    os.utime(shard, ns=(mtime + 10**9, mtime + 10**9))
    line, again, rewritten = imported()
    # The import ran again and rewrote its reference; the same bytes give the same record but
    # for its time, which has whole seconds (both can fall in one).
    assert "reused 0 of 1 imports" in line and rewritten != reference
    untimed = [
        replace(ImportRecord.from_dict(json.loads(t)), created_at="") for t in (again, record)
    ]
    assert untimed[0] == untimed[1]
    next(Path(spec.reference).iterdir()).unlink()
    line, _, restored = imported()
    assert "reused 0 of 1 imports" in line and restored.keys() == reference.keys()
    assert "reused 1 of 1 imports" in imported()[0]


@pytest.mark.torchrun
def test_a_folder_that_reads_outside_itself_is_an_error_for_its_cells(in_tmp):
    """A .metadata that places an entry's data outside the folder (DCP reads it there:
    docs/torch-notes.md) is refused by the import, naming the entry; no cell loads it."""
    import dataclasses
    import pickle

    write_torchtitan_checkpoint(in_tmp / "titan")
    meta = in_tmp / "titan" / ".metadata"
    metadata = pickle.loads(meta.read_bytes())
    index, info = next(iter(metadata.storage_data.items()))
    (in_tmp / "outside.distcp").write_bytes((in_tmp / "titan" / info.relative_path).read_bytes())
    metadata.storage_data[index] = dataclasses.replace(info, relative_path="../outside.distcp")
    meta.write_bytes(pickle.dumps(metadata))
    raw = _config(str(in_tmp / "titan"))
    raw["layouts"] = {"single": raw["layouts"]["single"]}
    row = run_existing(raw)["single"]
    assert row["status"] == "error" and row["reason"].startswith("import: "), row["reason"]
    assert f"refused: entry {index.fqn} is read from '../outside.distcp', outside" in row["reason"]


# --- checkpoints from outside: other processes' DCP folders (tests/outside) -----------------

WRITER = REPO / "tests/outside/write_checkpoints.py"
# The grid names the writer's llama by this hf_models name (the writer: "llama").
LLAMA = "llama_tiny"
# One optimizer entry of llama_torchtitan, altered in its files after the save (a copy).
ALTERED = "optimizer.param_groups.model.layers.1.mlp.up_proj.weight.lr"
ALTERED_OURS = "optim.param_groups.user_model.model.layers.1.mlp.up_proj.weight.lr"
NAMINGS = {"torchtitan_objects": "torchtitan", "mine": "tests.outside.names:ours"}
# The loaders' recipes: with an LR scheduler (one param group), and without (two).
WITH, WITHOUT = "adam_lr_warmup", "adamw_param_groups"


def alter_bytes_entry(folder: Path, entry: str, value) -> None:
    """Give a non-tensor entry of a DCP folder another value after its save: the new value's
    bytes appended to the entry's file, its ``.metadata`` pointed at them."""
    import dataclasses
    import io
    import pickle

    import torch

    meta_path = folder / ".metadata"
    metadata = pickle.loads(meta_path.read_bytes())
    index = next(i for i in metadata.storage_data if i.fqn == entry)
    info = metadata.storage_data[index]
    blob = io.BytesIO()
    torch.save(value, blob)
    data = folder / info.relative_path
    offset = data.stat().st_size
    with data.open("ab") as out:
        out.write(blob.getvalue())
    metadata.storage_data[index] = dataclasses.replace(
        info, offset=offset, length=len(blob.getvalue())
    )
    meta_path.write_bytes(pickle.dumps(metadata))


def outside_config(folder: Path) -> dict:
    checkpoints = {
        spec.name: {
            "path": str(folder / spec.name),
            "model": LLAMA if spec.model == "llama" else spec.model,
            "naming": NAMINGS.get(spec.layout, spec.layout),
        }
        for spec in writer.CHECKPOINTS
    }
    altered = {**checkpoints["llama_torchtitan"], "path": str(folder / "llama_altered")}
    return {
        "models": ["mlp", writer.MY_MODEL, LLAMA],
        "hf_models": {LLAMA: writer.LLAMA},
        "layouts": {
            "single": {"framework": "single", "mesh": [1]},
            "fsdp2_2": {"framework": "fsdp2", "mesh": [2]},
            "tp_2": {"framework": "tp", "mesh": [2]},
            "fsdp2_tp_2x2": {"framework": "fsdp2_tp", "mesh": [2, 2]},
        },
        "pairs": "none",
        "optimizer": [WITH, WITHOUT],
        "train": {"global_batch": 4},
        "checkpoints": {**checkpoints, "llama_altered": altered},
    }


@dataclass(frozen=True)
class Outside:
    config: dict
    rows: list[dict]  # matrix.parquet
    tensors: list[dict]  # tensors.parquet
    records: dict[str, ImportRecord]  # checkpoint name -> its import record


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Outside:
    """Every checkpoint of tests/outside/write_checkpoints.py, written by one 2-rank torchrun
    launch of its own (no dcp-matrix job), and a copy of llama_torchtitan with ALTERED changed;
    each imported, then loaded by one load job per layout, then aggregated."""
    import os
    import shutil

    from pipeline_lib.job.existing import import_checkpoint
    from tests.jobs import cli_all

    folder = tmp_path_factory.mktemp("outside")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", str(WRITER), str(folder / "written")]  # fmt: skip
    proc = procs.run(command, timeout=300, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    shutil.copytree(folder / "written/llama_torchtitan", folder / "written/llama_altered")
    alter_bytes_entry(folder / "written/llama_altered", ALTERED, 0.5)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("PYTHONPATH", str(REPO))
        cfg = config.validate(outside_config(folder / "written"))
        for name in cfg["checkpoints"]:
            import_checkpoint(grid.existing_spec(cfg, name))
        layouts = [layout for _, layout in grid.load_jobs(cfg)]
        cli_all("load", [grid.load_job_spec(cfg, grid.RESULTS, layout) for layout in layouts])
        records = [p for layout in layouts for p in grid.load_outputs(cfg, grid.RESULTS, layout)]
        run_cli("aggregate", "--matrix", "m.parquet", "--tensors", "t.parquet", *records)
        imported = {
            n: read_checked(grid.existing_record_path(n), ImportRecord) for n in cfg["checkpoints"]
        }
        for path in records:
            read_checked(path, LoadRecord)
        rows, tensors = (pq.read_table(p).to_pylist() for p in ("m.parquet", "t.parquet"))
        return Outside(cfg, rows, tensors, imported)


def matched(name: str) -> str:
    """The loaders' recipe whose optimizer and scheduler a checkpoint's writer had."""
    return next(WITH if s.scheduler else WITHOUT for s in writer.CHECKPOINTS if s.name == name)


@pytest.mark.torchrun
def test_other_processes_checkpoints_load_bit_for_bit_under_every_layout(outside):
    """Each model kind (built-in, import path, hf_models) and naming (dcp_matrix, torchtitan
    in both scheduler forms, one of yours), optimizer flattened or by index, with and without
    an LR scheduler: every entry of the files, the optimizer's and the scheduler's too, is
    compared and equal under single, FSDP2, TP and FSDP2+TP."""
    layouts = set(outside.config["layouts"])
    for name in set(outside.config["checkpoints"]) - {"llama_altered"}:
        cells = [
            r for r in outside.rows if (r["save_layout"], r["optimizer"]) == (name, matched(name))
        ]
        assert {r["load_layout"] for r in cells} == layouts, name
        record = outside.records[name]
        for row in cells:
            assert (row["status"], row["reason"]) == ("pass", ""), (name, row["load_layout"])
            assert row["entries_checked"] == len(record.entries) > 30, name
            assert row["resume_max_rel_diff"] <= 1e-5
        assert record.unplaced_entries == [], name
    compared = {(t["save_layout"], t["entry"]) for t in outside.tensors if t["load_equal"]}
    for entry in (
        "optim.state.user_model.model.layers.0.mlp.up_proj.weight.exp_avg",
        "optim.param_groups.user_model.lm_head.weight.weight_decay",
        "scheduler.last_epoch",
    ):
        assert ("llama_torchtitan", entry) in compared
    assert ("my_model_torchtitan", "scheduler.base_lrs") in compared  # its one object entry
    assert ("my_model_dcp_matrix", "optim.param_groups.0.params") in compared
    assert ("my_model_mine", "optim.state.user_model.head.weight.exp_avg_sq") in compared
    assert ("llama_dcp_matrix", "optim.param_groups.1.params") in compared
    assert ("llama_mine", "optim.param_groups.user_model.lm_head.weight.initial_lr") in compared
    assert ("mlp_mine", "optim.param_groups.head.bias.lr") in compared
    assert ("mlp_torchtitan", "scheduler.last_epoch") in compared


@pytest.mark.torchrun
def test_an_altered_optimizer_entry_of_an_outside_checkpoint_fails_naming_it(outside):
    """One parameter's lr changed in the files: set_optimizer_state_dict takes each param
    group's settings from its first parameter, so the load drops it, and check 2 says so."""
    cells = [
        r for r in outside.rows if (r["save_layout"], r["optimizer"]) == ("llama_altered", WITH)
    ]
    assert {r["load_layout"] for r in cells} == set(outside.config["layouts"])
    for row in cells:
        assert row["status"] == "fail", row["load_layout"]
        assert row["reason"].startswith(f"loader vs saver: 1 of {row['entries_checked']} "), row
        assert ALTERED_OURS in row["reason"], row["reason"]


@pytest.mark.torchrun
def test_a_scheduler_one_side_lacks_fails_naming_its_entries(outside):
    """A checkpoint's LR scheduler loaded by a trainer without one (its entries missing in the
    loader's state), and a trainer's scheduler the checkpoint lacks (not in the saver's)."""
    notes = {(t["save_layout"], t["optimizer"], t["load_layout"], t["entry"]): t["note"]
             for t in outside.tensors}  # fmt: skip
    for spec in writer.CHECKPOINTS:
        recipe = WITHOUT if spec.scheduler else WITH
        note = "missing in the loader's state" if spec.scheduler else "not in the saver's state"
        cells = [
            r for r in outside.rows if (r["save_layout"], r["optimizer"]) == (spec.name, recipe)
        ]
        assert len(cells) == len(outside.config["layouts"])
        for row in cells:
            assert row["status"] == "fail", (spec.name, row["load_layout"])
            found = notes[spec.name, recipe, row["load_layout"], "scheduler.last_epoch"]
            assert found.endswith(note), (spec.name, found)
