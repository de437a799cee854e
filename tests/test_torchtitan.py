"""Checkpoints torchtitan's own code wrote (examples/torchtitan_train.py), loaded into
torchtitan's own model classes (``torchtitan_models``), and torchtitan <-> Hugging Face
conversion (pipeline_lib/verify/torchtitan_hf.py).

Without torchtitan: the ``torchtitan`` naming against the recorded manifest of a real step
folder (tests/outside/torchtitan_llama3_debug.json), the scheduler entries torchtitan does not
save, the config's refusals. With the extra (``setup.sh --dev`` installs it): one 2-rank writer
launch, its two llama3 folders imported and loaded by one TP load job, and the conversion
checked both ways, broken on purpose too."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline_lib.plan import config, grid
from pipeline_lib.plan.config import ConfigError
from pipeline_lib.verify import checkpoint_names
from pipeline_lib.verify.results import ImportRecord, LoadResult
from tests import procs
from tests.conftest import REPO
from tests.outside.torchtitan_manifest import FIXTURE
from tests.record_schemas import read_checked

TITAN = checkpoint_names.Naming("torchtitan")
HAS_TORCHTITAN = importlib.util.find_spec("torchtitan") is not None
needs_torchtitan = pytest.mark.skipif(
    not HAS_TORCHTITAN,
    reason="the optional extra torchtitan is not installed (bash scripts/setup.sh --torchtitan)",
)
# What torch's LambdaLR (the loaders' adam_lr_warmup) holds: the names of its state entries.
LAMBDA_LR = ("_get_lr_called_within_step", "_is_initial", "_last_lr", "_step_count",
             "base_lrs", "last_epoch", "lr_lambdas")  # fmt: skip


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads(FIXTURE.read_text())


def placed(recorded: dict) -> checkpoint_names.Placement:
    """The recorded folder's entries placed for its model as this tool runs it (wrapped)."""
    known = {f"model.user_model.{n}" for n in recorded["model_state"]}
    return checkpoint_names.place(recorded["entries"], TITAN, known, wrapper="user_model.")


def test_a_real_torchtitan_folder_places_every_entry(recorded):
    """Every model, optimizer and LR scheduler entry torchtitan 0.3.0 wrote has a place; the
    data loader's and the trainer's own are left out, and nothing else."""
    places = placed(recorded)
    assert places.unplaced == ()
    assert set(places.excluded) == {
        e for e in recorded["entries"] if e.startswith(("dataloader.", "train_state."))
    }
    assert {"dataloader.world_size", "train_state.step"} <= set(places.excluded)
    assert places.flattened_optim  # param groups keyed by parameter
    ours = places.ours
    assert ours["lr_scheduler.last_epoch"] == "scheduler.last_epoch"
    assert [e for e in recorded["entries"] if e.startswith("lr_scheduler")] == [
        "lr_scheduler.last_epoch"
    ]  # torchtitan saves last_epoch only (flattened by dcp.save): no lr_scheduler.base_lrs
    model = {f"model.user_model.{n}" for n in recorded["model_state"]}
    assert {m for m in ours.values() if m.startswith("model.")} == model
    params = set(recorded["parameters"])
    for entry, mine in ours.items():
        if parts := checkpoint_names.split_fqn(mine):
            head, fqn, _ = parts
            if head != checkpoint_names.MODEL:  # optimizer entries name the model's parameters
                assert fqn.removeprefix("user_model.") in params, entry


def test_the_fused_projection_is_named_twice(recorded):
    """torchtitan's FusedQKVLinear saves its one parameter wqkv as three model entries (a
    state_dict hook splits it), while the optimizer's entries name the parameter: the
    checkpoint's model and optimizer entries of one parameter have different names."""
    entries = recorded["entries"]
    qkv = "layers.0.attention.qkv_linear"
    assert f"{qkv}.wqkv.weight" not in entries
    assert {entries[f"{qkv}.{w}.weight"] for w in ("wq", "wk", "wv")} == {
        "tensor float32 [256, 256]"
    }
    assert entries[f"optimizer.state.{qkv}.wqkv.weight.exp_avg"] == "tensor float32 [768, 256]"
    assert f"{qkv}.wqkv.weight" in recorded["parameters"]
    assert f"{qkv}.wq.weight" in recorded["model_state"]


def test_loader_scheduler_entries_torchtitan_does_not_save_are_not_compared():
    loader = [f"scheduler.{key}" for key in LAMBDA_LR] + ["optim.state.w.step"]
    titan_saved = ["scheduler.last_epoch", "model.w"]
    others = [f"scheduler.{k}" for k in LAMBDA_LR if k != "last_epoch"]
    assert checkpoint_names.uncompared("torchtitan", titan_saved, loader) == others
    # Compared as before: another naming, a whole scheduler state, or none saved (a loader's
    # scheduler that the checkpoint lacks still fails the cell).
    assert checkpoint_names.uncompared("dcp_matrix", titan_saved, loader) == []
    assert (
        checkpoint_names.uncompared("torchtitan", [*titan_saved, "scheduler.base_lrs"], loader)
        == []
    )
    assert checkpoint_names.uncompared("torchtitan", ["model.w"], loader) == []


def test_a_writer_manifest_is_a_bounded_json_object_from_a_regular_file(tmp_path):
    from pipeline_lib.job.existing import MANIFEST_MAX_BYTES, writer_manifest

    (tmp_path / "ok.json").write_text('{"torchtitan": "0.3.0"}')
    assert writer_manifest(str(tmp_path / "ok.json")) == {"torchtitan": "0.3.0"}
    (tmp_path / "list.json").write_text("[1]")
    (tmp_path / "big.json").write_text('{"a": "' + "x" * MANIFEST_MAX_BYTES + '"}')
    os.mkfifo(tmp_path / "fifo")  # no writer: an open that waited for one would hang here
    for bad, why in (("list.json", "not a JSON object"), ("big.json", "not a JSON object"),
                     ("fifo", "not a regular file")):  # fmt: skip
        with pytest.raises(ValueError, match=why):
            writer_manifest(str(tmp_path / bad))


def test_config_refuses_a_torchtitan_model_it_does_not_know(tmp_path):
    raw = {
        "models": ["titan"],
        "torchtitan_models": {"titan": {"model": "llama9", "flavor": "debugmodel"}},
        "layouts": {"single": {"framework": "single", "mesh": [1]}},
    }
    with pytest.raises(ConfigError, match=r"torchtitan_models\.titan\.model"):
        config.validate(raw)
    raw["torchtitan_models"]["titan"] = {"model": "llama3", "flavor": "debugmodel", "x": 1}
    with pytest.raises(ConfigError, match=r"torchtitan_models\.titan"):
        config.validate(raw)


@needs_torchtitan
def test_config_refuses_a_flavor_torchtitan_lacks():
    raw = {
        "models": ["titan", "titan_dense"],
        "torchtitan_models": {
            "titan": {"model": "llama3", "flavor": "nope"},
            "titan_dense": {"model": "llama3", "flavor": "debugmodel", "num_experts": 2},
        },
        "layouts": {"single": {"framework": "single", "mesh": [1]}},
    }
    with pytest.raises(ConfigError) as refused:
        config.validate(raw)
    assert "torchtitan_models.titan.flavor: torchtitan llama3 has none named 'nope'" in str(
        refused.value
    )
    assert "torchtitan_models.titan_dense.num_experts: torchtitan llama3 debugmodel has no MoE" in (
        str(refused.value)
    )


def test_a_measured_grid_holds_its_existing_checkpoints_cells():
    """expectations: a grid with ``checkpoints`` measured each model's checkpoint under every
    layout (save side: framework existing, no mesh); without it, none."""
    from pipeline_lib.plan.expectations import EXISTING, MeasuredGrid

    entry = {"run": "r", "models": ["m"], "layouts": {"tp_2": {"framework": "tp", "mesh": [2]}},
             "pairs": "none", "optimizer": ["adam_lr_warmup"]}  # fmt: skip
    tp = ("tp", "2", None, None)
    with_checkpoints = MeasuredGrid.parse({**entry, "checkpoints": ["c"]}, "measured.0")
    (variant,) = with_checkpoints.variants  # the default variant, the loaders' optimizer
    assert with_checkpoints.holds("m", EXISTING, tp, variant)
    assert not with_checkpoints.holds("other", EXISTING, tp, variant)
    assert not MeasuredGrid.parse(entry, "measured.0").holds("m", EXISTING, tp, variant)


# --- torchtitan's own writer, its folders through the grid ------------------------------------

WRITER = REPO / "examples/torchtitan_train.py"
WRITTEN = ("llama3_debug", "llama3_debug_unfused")


@dataclass(frozen=True)
class Titan:
    folder: Path  # the writer's output: <name>/checkpoint/step-2, <name>/writer.json
    rows: dict[str, dict]  # checkpoint name -> its tp_2 cell
    records: dict[str, ImportRecord]  # checkpoint name -> its import record
    loads: dict[str, LoadResult]  # checkpoint name -> its load result


def titan_config(folder: Path) -> dict:
    defs = {"llama3_debug": {}, "llama3_debug_unfused": {"fuse_qkv": False}}
    return {
        "models": list(WRITTEN),
        "torchtitan_models": {
            n: {"model": "llama3", "flavor": "debugmodel", **defs[n]} for n in WRITTEN
        },
        "layouts": {"tp_2": {"framework": "tp", "mesh": [2]}},
        "pairs": "none",
        "optimizer": ["adam_lr_warmup"],
        "train": {"lr": 0.0008, "global_batch": 4},
        "checkpoints": {name: checkpoint(folder, name) for name in WRITTEN},
        "run": {"cell_timeout_s": 300},
    }


def checkpoint(folder: Path, name: str) -> dict:
    """The config entry of the writer's checkpoint ``name`` (its step folder and manifest)."""
    step, manifest = folder / name / "checkpoint/step-2", folder / name / "writer.json"
    return {"path": str(step), "model": name, "naming": "torchtitan", "manifest": str(manifest)}


@pytest.fixture(scope="module")
def titan(tmp_path_factory) -> Titan:
    """One 2-rank launch of torchtitan's writer (two llama3 debug models), each folder
    imported, both loaded by one TP load job, aggregated."""
    from pipeline_lib.job.existing import import_checkpoint
    from tests.jobs import cli_all
    from tests.test_existing import run_cli

    root = tmp_path_factory.mktemp("torchtitan")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", str(WRITER), str(root / "written"), ",".join(WRITTEN)]  # fmt: skip
    proc = procs.run(command, timeout=300, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("PYTHONPATH", str(REPO))
        cfg = config.validate(titan_config(root / "written"))
        for name in cfg["checkpoints"]:
            import_checkpoint(grid.existing_spec(cfg, name))
        spec = grid.load_job_spec(cfg, grid.RESULTS, "tp_2")
        cli_all("load", [spec])
        records = grid.load_outputs(cfg, grid.RESULTS, "tp_2")
        run_cli("aggregate", "--matrix", "m.parquet", "--tensors", "t.parquet", *records)
        rows = {r["save_layout"]: r for r in pq.read_table("m.parquet").to_pylist()}
        imported = {n: read_checked(grid.existing_record_path(n), ImportRecord) for n in WRITTEN}
        loads = {
            n: read_checked(p, LoadResult)
            for n in WRITTEN
            for p in Path(spec.work_dir).glob(f"results/*.{n}.json")
        }
        return Titan(root / "written", rows, imported, loads)


@needs_torchtitan
@pytest.mark.torchrun
def test_the_writer_leaves_the_folder_the_manifest_records(titan, recorded):
    """torchtitan's writer, run now, writes the entries (names, dtypes, shapes) the committed
    manifest holds: the naming tests above test what torchtitan writes."""
    from tests.outside.torchtitan_manifest import folder_entries

    assert (
        folder_entries(str(titan.folder / "llama3_debug/checkpoint/step-2"))
        == (recorded["entries"])
    )
    manifest = json.loads((titan.folder / "llama3_debug/writer.json").read_text())
    assert manifest["torchtitan"] == "0.3.0" and set(manifest["stand_ins"]) == {
        "attention", "parallelize", "gradient_reduction"
    }  # fmt: skip


@needs_torchtitan
@pytest.mark.torchrun
def test_a_torchtitan_folder_loads_bit_for_bit_into_torchtitans_model(titan):
    """Separate wq/wk/wv: every entry the folder holds equals the loader's under TP, the
    scheduler's last_epoch among them; the loader's scheduler entries torchtitan does not save
    are listed, not compared; the import record carries the writer's manifest."""
    row = titan.rows["llama3_debug_unfused"]
    assert (row["status"], row["reason"]) == ("pass", ""), row["reason"]
    assert row["entries_checked"] > 900 and row["entries_mismatched"] == 0
    record = titan.records["llama3_debug_unfused"]
    assert "LRSchedulersContainer saves last_epoch only" in record.uncompared
    assert record.writer_manifest["stand_ins"]["attention"].startswith("torchtitan's")
    assert record.entries["scheduler.last_epoch"].kind != ""
    load = titan.loads["llama3_debug_unfused"]
    assert load.entries["scheduler.last_epoch"].equal
    assert "scheduler.base_lrs" in load.uncompared_entries
    assert "scheduler.last_epoch" not in load.uncompared_entries


@needs_torchtitan
@pytest.mark.torchrun
def test_torchtitans_fused_projection_breaks_torchs_state_dict_api(titan):
    """As torchtitan ships it (FusedQKVLinear): torch's get_state_dict walks each state dict
    key as attributes and finds no ``wq`` (a finding: every load layout is ``error``)."""
    row = titan.rows["llama3_debug"]
    assert row["status"] == "error"
    assert "'FusedQKVLinear' object has no attribute 'wq'" in row["reason"]
    assert titan.records["llama3_debug"].unplaced_entries == []  # the naming placed it all


# --- torchtitan <-> Hugging Face -------------------------------------------------------------


@needs_torchtitan
@pytest.mark.torchrun
def test_conversion_both_ways_is_exact_and_the_logits_agree(titan, tmp_path):
    from pipeline_lib.models._torchtitan import TitanModelDefinition
    from pipeline_lib.verify import torchtitan_hf

    definition = TitanModelDefinition("llama3", "debugmodel")
    to_hf = torchtitan_hf.from_torchtitan(
        str(titan.folder / "llama3_debug/checkpoint/step-2"), definition
    )
    torchtitan_hf.write_hf(str(tmp_path / "hf"), definition)
    back = torchtitan_hf.from_hf(str(tmp_path / "hf"), definition)
    for found in (to_hf, back):
        assert found.ok, found
        assert found.entries == 57 and found.logits_max_abs_diff <= 1e-5


@needs_torchtitan
@pytest.mark.torchrun
def test_an_adapter_that_renames_without_permuting_fails_only_on_the_logits(titan, monkeypatch):
    """Broken on purpose: the q/k permutation dropped. The loaded tensors still equal that
    adapter's conversion and its round trip is still the identity; the logits differ."""
    from torchtitan.models.llama3 import Llama3StateDictAdapter

    from pipeline_lib.models._torchtitan import TitanModelDefinition
    from pipeline_lib.verify import torchtitan_hf

    identity = lambda self, w, *args: w  # noqa: E731
    monkeypatch.setattr(Llama3StateDictAdapter, "_permute", identity)
    monkeypatch.setattr(Llama3StateDictAdapter, "_reverse_permute", identity)
    found = torchtitan_hf.from_torchtitan(
        str(titan.folder / "llama3_debug/checkpoint/step-2"),
        TitanModelDefinition("llama3", "debugmodel"),
    )
    assert found.converted_equal and found.round_trip_equal
    assert found.logits_max_abs_diff > 100 * found.logits_atol and not found.ok
