"""Incremental reruns (pipeline_lib.job.reuse): a rerun computes only the units whose inputs changed."""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import shutil
import struct
import subprocess
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import psutil
import pytest
import yaml

from pipeline_lib.job import reuse
from pipeline_lib.plan import grid
from pipeline_lib.plan.config import validate
from pipeline_lib.plan.specs import JobSpec
from pipeline_lib.verify.results import CellRows, LoadRecord
from tests.conftest import REPO
from tests.jobs import cli, cli_all
from tests.record_schemas import read_checked
from tests.test_snakemake import BIN, snakemake


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


def test_manifest_sees_an_edit_that_restores_size_and_modification_time(tmp_path, monkeypatch):
    """A file too large to hash, edited in place with its modification time set back: its
    status-change time differs. A .metadata is hashed whatever its size."""
    monkeypatch.setattr(reuse, "DIGEST_UP_TO", 0)
    shard, meta = tmp_path / "__0_0.distcp", tmp_path / ".metadata"
    shard.write_bytes(b"0123456789")
    meta.write_bytes(b"metadata")
    before = reuse.manifest(tmp_path)
    assert before["__0_0.distcp"][3] is None and before[".metadata"][3] is not None
    stat = shard.stat()
    with shard.open("r+b") as f:
        f.seek(5)
        f.write(b"X")
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = reuse.manifest(tmp_path)
    assert after["__0_0.distcp"][:2] == before["__0_0.distcp"][:2]  # size, mtime as they were
    assert after != before
    assert reuse.manifest(shard) == {"__0_0.distcp": after["__0_0.distcp"]}  # a file: itself
    assert reuse.manifest(tmp_path / "missing") == {}


def _load_cell(cfg: dict):
    job = grid.load_job_spec(validate(cfg), "results", "single")
    item = job.items[0]
    return item, item.sources[0]


def test_cell_key_follows_every_file_the_cell_reads(small_config, in_tmp):
    """The checkpoint, the seal beside it, the saver's reference and reload result: a change to
    any one changes the cell's key (computed from the files each time, nothing cached)."""
    item, source = _load_cell(small_config)
    store = reuse.Store(in_tmp / "reuse")
    saved = Path(source.paths.reference).parent
    files = [
        Path(source.paths.checkpoint) / "__0_0.distcp",
        Path(source.paths.checkpoint) / ".metadata",
        Path(f"{source.paths.checkpoint}.seal.json"),
        Path(source.paths.reference) / "rank-0.pt",
        saved / "saver_reload.json",
    ]
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"as saved")
    Path(source.save_record).write_text('{"status": "ok"}')
    key = store.cell_key(item, source)
    assert store.cell_key(item, source) == key
    for path in files:
        path.write_bytes(b"as edited")  # the same size
        changed = store.cell_key(item, source)
        assert changed != key, path
        key = changed
    files[0].unlink()
    assert store.cell_key(item, source) != key


def test_cell_key_of_an_existing_checkpoint_follows_its_folder(small_config, in_tmp):
    """A cell of an existing checkpoint reads the user's folder (not below results/): a file
    of it changed changes the cell's key, whatever the import's record says."""
    folder = in_tmp / "elsewhere" / "ckpt"
    folder.mkdir(parents=True)
    (folder / ".metadata").write_bytes(b"one")
    cfg = {**small_config, "checkpoints": {"ext": {"path": str(folder), "model": "mlp"}}}
    item, _ = _load_cell(cfg)
    source = next(s for s in item.sources if s.naming is not None)
    Path(source.save_record).parent.mkdir(parents=True)
    Path(source.save_record).write_text('{"status": "ok"}')
    store = reuse.Store(in_tmp / "reuse")
    key = store.cell_key(item, source)
    (folder / ".metadata").write_bytes(b"two")
    assert store.cell_key(item, source) != key


def test_a_store_that_does_not_read_reuses_nothing_and_still_keeps(small_config, in_tmp):
    """Reuse off (config reuse: false, a forced rule): every lookup misses, every result is
    kept for the next run."""
    item = _save_item(small_config, "mlp")
    Path(item.paths.checkpoint).mkdir(parents=True)
    Path(item.record).write_text('{"status": "ok"}\n')
    reading, writing = reuse.Store(in_tmp / "reuse"), reuse.Store(in_tmp / "reuse", read=False)
    writing.keep_saved(item)
    writing.keep_cell("k", CellRows(cell={}, tensors=[]))
    assert reading.saved_record(item) == '{"status": "ok"}\n' and reading.cell("k")
    assert writing.saved_record(item) is None and writing.cell("k") is None
    spec = JobSpec("save", {}, {}, "w", (), reuse_dir="r")
    assert reuse.Store.of(spec, read=False) == reuse.Store(Path("r"), read=False)


def test_the_switch_reuse_is_validated_and_changes_no_result_hash(small_config):
    from pipeline_lib.plan.config import ConfigError, config_hash

    assert validate(small_config)["reuse"] is True
    off = validate({**small_config, "reuse": False})
    assert off["reuse"] is False and config_hash(off) == config_hash(validate(small_config))
    # Snakemake's --config reuse=false gives the string 'false': the error says what to write.
    with pytest.raises(
        ConfigError, match=r"config: reuse: 'false' is not a boolean .*: True or False"
    ):
        validate({**small_config, "reuse": "false"})


@pytest.mark.parametrize(
    ("argv", "config", "reuses"),
    [([], {"reuse": True}, True), (["--no-reuse"], {"reuse": True}, False),
     ([], {"reuse": False}, False), ([], None, True), (["--no-reuse"], None, False)],
)  # fmt: skip
def test_a_job_reuses_unless_told_not_to(argv, config, reuses):
    from pipeline_lib import cli as cli_module

    args = cli_module.build_parser().parse_args(["load", "--spec", "{}", *argv])
    assert cli_module._reuses(args, config) is reuses


def _settings(**given):
    base = {"forceall": False, "forcerun": set(), "forcetargets": False, "targets": set()}
    return SimpleNamespace(**{**base, **given})


@pytest.mark.parametrize(
    ("settings", "forced"),
    [
        (None, set()),
        (_settings(), set()),
        (_settings(forceall=True), {"save", "load", "import"}),  # -F
        (_settings(forcerun={"load_checkpoints"}), {"load"}),  # -R load_checkpoints
        (_settings(forcerun={"results/save/mlp/single.json"}), {"save"}),  # -R <a record>
        (_settings(forcetargets=True, targets={"results/existing/ext.json"}), {"import"}),  # -f
        (_settings(forcetargets=True), set()),  # -f of the default target: rule all
    ],
)
def test_a_forced_rule_runs_its_jobs_without_reuse(
    small_config, in_tmp, settings, forced, monkeypatch
):
    from pipeline_lib.plan.snakemake_view import FORCED_ENV, Plan

    monkeypatch.setenv(FORCED_ENV, "")  # undone after the test: the Plan below sets it
    (in_tmp / "ckpt").mkdir()
    (in_tmp / "ckpt" / ".metadata").write_bytes(b"")
    cfg = {**small_config, "checkpoints": {"ext": {"path": "ckpt", "model": "mlp"}}}
    plan = Plan(cfg, ".", announce=True, dag_settings=lambda: settings)
    wildcards = SimpleNamespace(layout="single", checkpoint="ext")
    flags = {
        "save": plan.save_job_reuse(wildcards),
        "load": plan.load_job_reuse(wildcards),
        "import": plan.import_reuse(wildcards),
    }
    assert {rule for rule, flag in flags.items() if str(flag) == "--no-reuse"} == forced
    assert all(str(flag) == "" for rule, flag in flags.items() if rule not in forced)
    # A cluster job's own Snakemake (started with --force) takes the main process's answer.
    job = Plan(cfg, ".", announce=False, dag_settings=lambda: _settings(forcetargets=True))
    assert str(job.load_job_reuse(wildcards)) == str(flags["load"])


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


def _log(root: Path, kind: str, layout: str) -> str:
    return (root / "results" / "logs" / kind / f"{layout}.log").read_text()


def _reused(root: Path, kind: str, layout: str) -> tuple[int, int]:
    log = _log(root, kind, layout)
    found = re.search(r"reused (\d+) of (\d+)", log)
    assert found, log
    return int(found[1]), int(found[2])


@pytest.mark.e2e
def test_adding_a_model_reruns_only_its_items(tmp_path):
    """The default matrix's use case in small: after a run, one more model reruns only its
    items and cells; the others' records stay byte for byte and their checkpoints untouched.
    Then a forced rule re-verifies: its jobs run every cell, none reused, and the run leaves
    Snakemake nothing to rerun after it."""
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

    snakemake(tmp_path, "--forcerun", "load_checkpoints")
    for layout in cfg["layouts"]:
        assert _reused(tmp_path, "load", layout) == (0, 4)
        assert "(reuse off for this run)" in _log(tmp_path, "load", layout)
        assert _reused(tmp_path, "save", layout) == (1, 2)  # not run: the log of the run before
    dry = snakemake(tmp_path, "--dry-run")
    assert "rule load_checkpoints" not in dry.stdout + dry.stderr, dry.stdout


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


# --- checkpoints changed after their save, by hand ----------------------------------------
# Each edit opens the file and changes its bytes, as someone outside the pipeline would; the
# entry is found through the checkpoint's .metadata (torch's public reader).


def _tensor_bytes(checkpoint: Path, fqn: str) -> tuple[Path, int, int]:
    """(file, offset, length) of the raw data of entry ``fqn`` in a DCP folder: its storage
    item (.metadata) is a torch.save archive; the data is its member ``data/0``."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(checkpoint)).read_metadata()
    info = next(v for k, v in metadata.storage_data.items() if k.fqn == fqn)
    path = checkpoint / info.relative_path
    with path.open("rb") as f:
        f.seek(info.offset)
        item = f.read(info.length)
    member = next(
        m for m in zipfile.ZipFile(io.BytesIO(item)).infolist() if m.filename.endswith("/data/0")
    )
    name_len, extra_len = struct.unpack(
        "<HH", item[member.header_offset + 26 : member.header_offset + 30]
    )
    start = info.offset + member.header_offset + 30 + name_len + extra_len
    return path, start, member.file_size


def _flip_byte(path: Path, at: int) -> None:
    with path.open("r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x55]))


@pytest.mark.torchrun
def test_a_checkpoint_changed_after_its_cells_ran_is_verified_again(in_tmp):
    """Four checkpoints, each loaded by one cell; then, by hand, a byte flipped in the middle of
    one's weight, a shard of another deleted, the .metadata of a third replaced by the fourth's.
    The load job run again (as Snakemake runs it when it reruns for any reason) verifies the
    three again, each failing and naming the entry or file, and reuses the untouched one's
    cell as it was."""
    raw = {
        "models": ["mlp", "mlp_frozen"],
        "layouts": {
            "single": {"framework": "single", "mesh": [1]},
            "fsdp2_2": {"framework": "fsdp2", "mesh": [2]},
            "tp_2": {"framework": "tp", "mesh": [2]},
        },
        "pairs": [["fsdp2_2", "single"], ["tp_2", "single"]],
        "train": {"steps": 2, "resume_steps": 2, "global_batch": 8},
        "run": {"cell_timeout_s": 120},
    }
    from torch.distributed.checkpoint import FileSystemReader

    cfg = validate(raw)
    cli_all(
        "save", [grid.save_job_spec(cfg, grid.RESULTS, layout) for layout in ("fsdp2_2", "tp_2")]
    )
    load = grid.load_job_spec(cfg, grid.RESULTS, "single")

    def cells() -> tuple[str, dict]:
        log = cli("load", load)
        rows = {}
        for model in raw["models"]:
            for row in read_checked(grid.load_record_path(model, "single"), LoadRecord).cells:
                rows[model, row["save_layout"]] = row
        return log, rows

    log, before = cells()
    assert "reused 0 of 4 load cells" in log and all(r["status"] == "pass" for r in before.values())

    weight = "model.blocks.0.fc1.weight"
    path, start, length = _tensor_bytes(in_tmp / grid.checkpoint_dir("mlp", "fsdp2_2"), weight)
    _flip_byte(path, start + length // 2)
    (in_tmp / grid.checkpoint_dir("mlp", "tp_2") / "__1_0.distcp").unlink()
    frozen = {s: in_tmp / grid.checkpoint_dir("mlp_frozen", s) for s in ("fsdp2_2", "tp_2")}
    (frozen["fsdp2_2"] / ".metadata").write_bytes((frozen["tp_2"] / ".metadata").read_bytes())

    log, after = cells()
    assert "reused 1 of 4 load cells" in log, log
    assert after["mlp_frozen", "tp_2"] == before["mlp_frozen", "tp_2"]  # reused as it was
    flipped = after["mlp", "fsdp2_2"]
    assert flipped["status"] == "fail" and f"first {weight}: bytes differ" in flipped["reason"], (
        flipped["reason"]
    )
    deleted = after["mlp", "tp_2"]
    assert deleted["status"] == "error" and "__1_0.distcp" in deleted["reason"], deleted["reason"]
    replaced = after["mlp_frozen", "fsdp2_2"]
    entries = FileSystemReader(str(frozen["tp_2"])).read_metadata().state_dict_metadata
    named = [fqn for fqn in entries if fqn in replaced["reason"]]
    assert replaced["status"] in ("fail", "error") and named, replaced["reason"]


# --- results folders left by others -------------------------------------------------------


def _wait_for(path_glob: str, root: Path, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not list(root.glob(path_glob)):
        assert proc.poll() is None, f"the run ended before {path_glob} appeared"
        assert time.monotonic() < deadline, f"no {path_glob} after {timeout_s} s"
        time.sleep(0.2)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL to the process and every process below it (the jobs, torchrun, the ranks), as
    a machine that loses power or an OOM killer ends them: nothing runs its cleanup."""
    if proc.poll() is None:  # not reaped yet: its pid is still its own
        parent = psutil.Process(proc.pid)
        for each in [parent, *parent.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                each.kill()
    proc.wait(timeout=60)


@pytest.mark.e2e
def test_a_second_run_in_the_folder_and_a_run_killed_mid_way(tmp_path):
    """A second Snakemake run in a folder where one runs is refused (Snakemake's lock) and
    runs nothing. The first, killed with SIGKILL while its load job's ranks are in the middle
    of a cell (its save job done), leaves a stale lock: the next run is refused, naming
    --unlock; after it, --rerun-incomplete gives the clean run's statuses, one row per cell."""
    cfg = {
        "models": ["mlp"],
        "layouts": {"single": {"framework": "single", "mesh": [1]}},
        "train": {"steps": 2, "resume_steps": 2, "global_batch": 8},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    matrix_only = ("--", "results/matrix.parquet")  # the target (the report adds nothing here)
    command = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
               "--cores", "2", "--configfile", str(tmp_path / "config.yaml"), *matrix_only]  # fmt: skip
    with (tmp_path / "first.log").open("w") as log:
        first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for("results/logs/save/single.log", tmp_path, first, 300)
        second = snakemake(tmp_path, *matrix_only, check=False)
        assert second.returncode != 0 and "Directory cannot be locked" in second.stderr
        assert "rule save_checkpoints" not in second.stdout + second.stderr
        _wait_for("results/work/load/single/progress.json", tmp_path, first, 300)
    finally:
        _kill_tree(first)
    assert list(tmp_path.glob("results/save/*/*.json")), "the save job had finished"
    assert not list(tmp_path.glob("results/load/*/*.json")), "killed before its records"

    stale = snakemake(tmp_path, *matrix_only, check=False)
    assert stale.returncode != 0 and "--unlock" in stale.stderr, stale.stderr
    snakemake(tmp_path, "--unlock")
    snakemake(tmp_path, "--rerun-incomplete", *matrix_only)
    matrix = pd.read_parquet(tmp_path / "results" / "matrix.parquet")
    assert list(matrix.status) == ["pass"], matrix.reason  # one row, as a clean run's
    assert _reused(tmp_path, "load", "single") == (0, 1)
