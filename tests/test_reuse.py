"""Incremental reruns (pipeline_lib.reuse): a rerun computes only the units whose inputs changed."""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline_lib import grid, reuse
from pipeline_lib.config import validate
from pipeline_lib.specs import JobSpec
from tests.jobs import cli
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


def _mlp_checkpoint(folder: Path, seed: int, monkeypatch) -> None:
    """An mlp checkpoint written by this tool's save job (``train.seed``: ``seed``) at
    ``folder``, in place of what was there."""
    work = folder.parent / f"saver-{seed}"
    work.mkdir()
    monkeypatch.chdir(work)
    single = {"single": {"framework": "single", "mesh": [1]}}
    cfg = validate({"models": ["mlp"], "layouts": single, "train": {"seed": seed}})
    cli("save", grid.save_job_spec(cfg, grid.RESULTS, "single"))
    shutil.rmtree(folder, ignore_errors=True)
    Path(grid.checkpoint_dir("mlp", "single")).rename(folder)
    monkeypatch.chdir(folder.parent)


@pytest.mark.e2e
def test_a_config_change_reuses_an_unchanged_import_and_its_cells(in_tmp, monkeypatch):
    """An existing checkpoint in the config: adding a model runs the import job again
    (Snakemake sees a changed config), which writes its record byte for byte and leaves the
    reference alone, so the checkpoint's cell is reused; the checkpoint saved again (other
    values) is imported again and its cell runs again."""
    kept = in_tmp / "kept"
    _mlp_checkpoint(kept, 0, monkeypatch)
    cfg = {
        "models": ["mlp"],
        "layouts": {"single": {"framework": "single", "mesh": [1]}},
        "pairs": "none",
        "checkpoints": {"kept": {"path": str(kept), "model": "mlp"}},
        "train": {"steps": 1, "resume_steps": 1, "global_batch": 8},
    }
    (in_tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
    snakemake(in_tmp)
    imported = in_tmp / "results" / "existing"
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in imported.rglob("*.pt")}
    record = (imported / "kept.json").read_bytes()
    assert before and _reused(in_tmp, "load", "single") == (0, 1)

    cfg["models"].append("mlp_frozen")
    (in_tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
    snakemake(in_tmp)
    log = (in_tmp / "results/logs/import/kept.log").read_text()
    assert "reused 1 of 1 imports" in log, log
    assert (imported / "kept.json").read_bytes() == record
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in imported.rglob("*.pt")} == before
    assert _reused(in_tmp, "load", "single") == (1, 1)  # mlp_frozen has no checkpoint

    _mlp_checkpoint(kept, 1, monkeypatch)  # the same checkpoint saved again, other values
    snakemake(in_tmp)
    log = (in_tmp / "results/logs/import/kept.log").read_text()
    assert "reused 0 of 1 imports" in log, log
    assert _reused(in_tmp, "load", "single") == (0, 1)
    matrix = pd.read_parquet(in_tmp / "results" / "matrix.parquet")
    assert list(matrix.status) == ["pass"], matrix.reason
