"""Incremental reruns (pipeline_lib.reuse): a rerun computes only the units whose inputs changed."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline_lib import grid, reuse
from pipeline_lib.config import validate
from pipeline_lib.specs import JobSpec
from tests.test_snakemake import snakemake


def _save_item(cfg: dict, model: str, layout: str = "single"):
    job = grid.save_job_spec(validate(cfg), "results", layout)
    return next(item for item in job.items if item.model == model)


def test_save_key_ignores_other_items(small_config, tmp_path):
    """Adding a model changes the item's index and the config hash, not its inputs key."""
    store = reuse.Store(tmp_path)
    wider = copy.deepcopy(small_config)
    wider["models"] = ["mlp_frozen", "mlp"]
    before, after = _save_item(small_config, "mlp"), _save_item(wider, "mlp")
    assert (before.id, before.config_hash) != (after.id, after.config_hash)
    assert store.save_key(before) == store.save_key(after)


@pytest.mark.parametrize(
    "change",
    [
        lambda c: c["train"].update(lr=0.02),
        lambda c: c["train"].update(steps=3),
        lambda c: c["layouts"]["single"].update(mesh=[1]) or c["run"].update(cell_timeout_s=99),
    ],
)
def test_save_key_changes_with_the_items_inputs(small_config, tmp_path, change):
    store = reuse.Store(tmp_path)
    changed = copy.deepcopy(small_config)
    change(changed)
    assert store.save_key(_save_item(small_config, "mlp")) != store.save_key(
        _save_item(changed, "mlp")
    )


def test_keys_change_with_code_and_environment(small_config, tmp_path, monkeypatch):
    store = reuse.Store(tmp_path)
    item = _save_item(small_config, "mlp")
    key = store.save_key(item)
    monkeypatch.setattr(reuse, "code_version", lambda: "another code version")
    assert store.save_key(item) != key
    monkeypatch.undo()
    monkeypatch.setattr(reuse, "environment", lambda: "another environment")
    assert store.save_key(item) != key


def test_cell_key_follows_the_save_record_bytes(small_config, in_tmp):
    job = grid.load_job_spec(validate(small_config), "results", "single")
    item, source = job.items[0], job.items[0].sources[0]
    store = reuse.Store(in_tmp / "reuse")
    Path(source.save_record).parent.mkdir(parents=True)
    Path(source.save_record).write_text('{"status": "ok"}')
    key = store.cell_key(item, source)
    assert store.cell_key(item, source) == key
    Path(source.save_record).write_text('{"status": "ok" }')
    assert store.cell_key(item, source) != key


def test_saved_record_needs_the_folder_as_it_was_left(small_config, in_tmp):
    item = _save_item(small_config, "mlp")
    store = reuse.Store(in_tmp / "reuse")
    Path(item.paths.checkpoint).mkdir(parents=True)
    (Path(item.paths.checkpoint) / "__0_0.distcp").write_bytes(b"abc")
    Path(item.record).write_text('{"status": "ok"}\n')
    store.keep_saved(item)
    assert store.saved_record(item) == '{"status": "ok"}\n'
    (Path(item.paths.checkpoint) / "__0_0.distcp").write_bytes(b"abd!")
    assert store.saved_record(item) is None
    assert reuse.Store.of(JobSpec("save", {}, {}, "w", ())) is None  # the fault campaign's


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every file the save and load jobs wrote: its bytes, and the modification time of every
    file but the records (<kind>/<model>/<layout>.json: Snakemake removes a job's records
    before it runs, the job writes them again)."""
    files = {}
    for kind in ("save", "load"):
        for path in sorted((root / "results" / kind).rglob("*")):
            if path.is_file():
                is_record = len(path.relative_to(root / "results" / kind).parts) == 2
                mtime = None if is_record else path.stat().st_mtime_ns
                files[str(path.relative_to(root))] = (path.read_bytes(), mtime)
    return files


def _reused(root: Path, kind: str, layout: str) -> tuple[int, int]:
    log = (root / "results" / "logs" / kind / f"{layout}.log").read_text()
    found = re.search(r"reused (\d+) of (\d+)", log)
    assert found, log
    return int(found[1]), int(found[2])


@pytest.mark.e2e
def test_adding_a_model_reruns_only_its_items(tmp_path):
    """The default matrix's use case in small: after a run, one more model reruns only its
    items and cells; the others' records stay byte for byte and their checkpoints untouched.
    Then a checkpoint changed behind the pipeline's back is noticed: its item and the cells of
    its checkpoint run again."""
    cfg = {
        "models": ["mlp"],
        "layouts": {
            "single": {"framework": "single", "mesh": [1]},
            "ddp_2": {"framework": "ddp", "mesh": [2]},
        },
        "train": {"steps": 2, "resume_steps": 2, "global_batch": 8},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    snakemake(tmp_path)
    before = _snapshot(tmp_path)
    assert any("checkpoint" in p for p in before) and any(p.endswith(".json") for p in before)

    cfg["models"].append("mlp_frozen")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    snakemake(tmp_path)
    after = _snapshot(tmp_path)
    changed = [p for p, value in before.items() if after.get(p) != value]
    assert not changed, changed  # records byte for byte, checkpoint files not rewritten
    for layout in cfg["layouts"]:
        assert _reused(tmp_path, "save", layout) == (1, 2)
        assert _reused(tmp_path, "load", layout) == (2, 4)
    matrix = pd.read_parquet(tmp_path / "results" / "matrix.parquet")
    assert len(matrix) == 8 and (matrix.status == "pass").all(), matrix.reason

    shard = next((tmp_path / "results/save/mlp/single/checkpoint").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes())  # same bytes, new modification time
    snakemake(tmp_path, "--forcerun", "save_checkpoints")
    assert _reused(tmp_path, "save", "single") == (1, 2)  # mlp_frozen's; mlp's ran again
    assert _reused(tmp_path, "save", "ddp_2") == (2, 2)
    for layout in cfg["layouts"]:
        assert _reused(tmp_path, "load", layout) == (3, 4)  # mlp saved under single: again
