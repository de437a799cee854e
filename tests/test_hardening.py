"""Hardening: no config, name or checkpoint can delete, overwrite or execute what it should not.

One section per item of the issue; each test failed before its fix (see the issue's note).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline_lib.common import atomic
from pipeline_lib.job import driver
from pipeline_lib.plan import config, disk_estimate, grid, torch_envs
from pipeline_lib.plan.config import ConfigError
from pipeline_lib.verify.results import ImportRecord, SaveRecord
from tests import procs
from tests.conftest import REPO
from tests.record_schemas import read_checked

PYTHON = sys.executable
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")


def small() -> dict:
    return {
        "models": ["mlp"],
        "layouts": {"single": {"framework": "single", "mesh": [1]}},
    }


def refused(cfg: dict, *expected: str) -> str:
    with pytest.raises(ConfigError) as info:
        config.validate(cfg)
    message = str(info.value)
    for text in expected:
        assert text in message, message
    return message


# --- 1. a torch version named '..' deletes the working directory ---------------------------


@pytest.mark.parametrize("name", ["..", ".", "a/b", ""])
def test_torch_version_names_that_are_not_folders_are_refused(name):
    cfg = {**small(), "torch_versions": {name: "torch==2.13.0"}}
    refused(cfg, "torch_versions")


def test_make_env_never_deletes_a_folder_it_did_not_make(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch_envs.subprocess, "run", lambda *a, **k: calls.append(a))
    precious = tmp_path / "usr"
    (precious / "bin").mkdir(parents=True)
    (precious / "bin" / "tool").write_text("keep me")
    with pytest.raises(torch_envs.NotOurs, match="refusing to delete"):
        torch_envs.make_env(precious, "torch==2.13.0")
    assert (precious / "bin" / "tool").read_text() == "keep me" and not calls


def test_make_env_rebuilds_a_folder_it_made(tmp_path, monkeypatch):
    def run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 0, stdout="torch==2.13.0\n")

    monkeypatch.setattr(torch_envs.subprocess, "run", run)
    prefix = tmp_path / "envs" / "t2_13"
    torch_envs.make_env(prefix, "torch==2.13.0")  # a new folder
    assert (prefix / torch_envs.MARKER).is_file()
    (prefix / "stale").write_text("from the last build")
    torch_envs.make_env(prefix, "torch==2.13.0")  # ours: rebuilt
    assert not (prefix / "stale").exists() and (prefix / "packages.txt").exists()


def test_make_env_refuses_a_requirement_that_is_not_torch(tmp_path):
    with pytest.raises(ValueError, match="not a pip requirement"):
        torch_envs.make_env(tmp_path / "e", "--index-url=http://evil")
    assert not (tmp_path / "e").exists()


# --- 2. layout names '.' and '..' empty other jobs' checkpoints -----------------------------


@pytest.mark.parametrize("name", [".", ".."])
def test_layout_names_dot_and_dot_dot_are_refused(name):
    cfg = small()
    cfg["layouts"][name] = {"framework": "single", "mesh": [1]}
    refused(cfg, "layouts:", repr(name))


def test_fresh_dir_refuses_a_folder_outside_the_working_directory(tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "results" / "save").mkdir(parents=True)
    (tmp_path / "other.txt").write_text("keep")
    monkeypatch.chdir(work)
    for path in ("results/save/mlp/../../../..", "..", ".", str(tmp_path)):
        with pytest.raises(ValueError, match="outside"):
            driver.fresh_dir(Path(path))
    assert (tmp_path / "other.txt").exists() and (work / "results" / "save").is_dir()
    assert driver.fresh_dir(Path("results/save/mlp/single")).is_dir()


def test_a_symlink_out_of_the_working_directory_is_not_emptied(tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data").write_text("keep")
    work = tmp_path / "work"
    (work / "results" / "save").mkdir(parents=True)
    (work / "results" / "save" / "mlp").symlink_to(outside)
    monkeypatch.chdir(work)
    with pytest.raises(ValueError, match="outside"):
        driver.fresh_dir(Path("results/save/mlp"))
    assert (outside / "data").exists()


# --- 3. torch_env_dir and torch_versions reach a shell and pip unchecked ---------------------


@pytest.mark.parametrize(
    "env_dir", ["x;touch pwned;/t", "a b", "$(id)", "`id`", "a{version}", "-rf", "../outside"]
)
def test_torch_env_dir_with_shell_characters_or_escaping_is_refused(env_dir):
    cfg = {**small(), "run": {"torch_env_dir": env_dir}}
    refused(cfg, "run.torch_env_dir")


def test_torch_env_dir_may_be_absolute(tmp_path):
    config.validate({**small(), "run": {"torch_env_dir": str(tmp_path / "envs")}})


@pytest.mark.parametrize(
    ("baseline", "why"),
    [
        ("x.yaml;touch pwned", "characters a shell or Snakemake would interpret"),
        ("{version}.yaml", "characters a shell or Snakemake would interpret"),
        ("-rf.yaml", "starts with '-'"),
        ("expectations/torch-2.13.0.py", "neither an expectations file"),
        ("expectations/torch-0.0.0.yaml", "is not a file"),
    ],
)
def test_a_baseline_that_would_reach_a_shell_or_does_not_exist_is_refused(baseline, why):
    refused({**small(), "baseline": baseline}, f"baseline: {baseline!r}", why)


def test_a_baseline_is_read_from_anywhere(tmp_path):
    """The baseline is only read, so an absolute path outside the working directory is fine."""
    import pandas as pd

    from pipeline_lib.plan.matrix_file import REQUIRED_COLUMNS

    pd.DataFrame([dict.fromkeys(REQUIRED_COLUMNS, "pass")]).to_parquet(tmp_path / "old.parquet")
    config.validate({**small(), "baseline": str(tmp_path / "old.parquet")})
    config.validate({**small(), "baseline": "expectations/torch-2.13.0.yaml"})


@pytest.mark.parametrize(
    "requirement",
    [
        "--index-url=http://evil/simple",
        "torch==2.13.0; rm -rf /",
        "torch @ file:///tmp/evil.whl",
        "numpy==2.0",
        'torch==2.13.0; python_version > "3"',
        "torch==2.13.0 --pre",
    ],
)
def test_torch_versions_must_be_a_plain_torch_requirement(requirement):
    refused({**small(), "torch_versions": {"t": requirement}}, "torch_versions.t")


@pytest.mark.parametrize("requirement", ["torch==2.14.1", "torch>=2.13,<2.15", "torch", "Torch"])
def test_torch_requirements_are_accepted(requirement):
    config.validate({**small(), "torch_versions": {"t": requirement}})


def test_every_interpreter_and_prefix_in_a_shell_command_is_quoted():
    rules = (REPO / "workflow" / "rules" / "matrix.smk").read_text()
    rules += (REPO / "workflow" / "rules" / "report.smk").read_text()
    assert "{params.python}" not in rules and "{params.prefix}" not in rules
    assert "{params.prefix:q}" in rules and rules.count("{params.python:q}") == 10


# --- 4. names: no length limit; Snakemake's PeriodicWildcardError ----------------------------


def test_a_long_layout_name_is_refused_and_the_limit_dry_runs(tmp_path):
    cfg = small()
    cfg["layouts"]["x" * 300] = {"framework": "single", "mesh": [1]}
    refused(cfg, "300 bytes long")
    ok = small()
    long_name = "L" + "".join(map(str, range(40)))[:63]
    assert len(long_name) == 64
    ok["layouts"] = {long_name: {"framework": "single", "mesh": [1]}}
    config.validate(ok)
    dry_run(tmp_path, ok)


def test_a_periodic_name_is_refused_with_the_reason(tmp_path):
    cfg = small()
    cfg["layouts"]["a" * 25] = {"framework": "single", "mesh": [1]}
    refused(cfg, "PeriodicWildcardError")
    # One repetition fewer is what Snakemake takes.
    ok = small()
    ok["layouts"] = {"a" * 19: {"framework": "single", "mesh": [1]}}
    dry_run(tmp_path, config.validate(ok))


def test_a_periodic_fault_cell_is_refused():
    cfg = {"models": [], "layouts": {}, "faults": []}
    name = "x.x.x.x.x.x.x.x.x.x.x.x.x"
    cfg["layouts"] = {name: {"framework": "single", "mesh": [1]}}
    cfg["faults"] = [{"fault": "flip_byte", "model": "mlp", "save": name, "load": name}]
    refused(cfg, "faults.0: fault cell", "PeriodicWildcardError")


def test_variant_ids_are_folder_names():
    import itertools
    from math import prod

    from pipeline_lib.common.name_rule import variant_id_error
    from pipeline_lib.plan.axes import AXES, Variant

    folders = set()
    for values in itertools.product(*AXES.values()):
        variant = Variant(*values)
        folder = grid.variant_folder(variant.id or "default")
        assert variant_id_error(folder) is None, variant.id
        assert grid.variant_dir(variant).count("/") in (0, 2)
        folders.add(folder)
    assert len(folders) == prod(len(values) for values in AXES.values())  # unique


def test_a_variant_id_longer_than_a_folder_name_keeps_its_start_and_a_digest():
    short = "mode-full+format-torch_save"
    assert grid.variant_folder(short) == short
    long_ids = [f"{short}+{'x' * 300}", f"{short}+{'x' * 299}y"]
    folders = [grid.variant_folder(i) for i in long_ids]
    assert all(len(f) == 255 and f.startswith(short) for f in folders)
    assert folders[0] != folders[1]  # the same first 235 characters, other ids


def dry_run(workdir: Path, cfg: dict, check: bool = True) -> subprocess.CompletedProcess:
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = procs.run(
        [SNAKEMAKE, "-n", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2",
         "--configfile", str(workdir / "config.yaml")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# --- 5. duplicate YAML keys --------------------------------------------------------------------


def test_duplicate_keys_are_refused_naming_key_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "models: [mlp]\n"
        "layouts:\n  single: {framework: single, mesh: [1]}\n"
        "pairs: all\n"
        "layouts:\n  ddp_2: {framework: ddp, mesh: [2]}\n"
    )
    with pytest.raises(ConfigError, match=r"line 5: duplicate key 'layouts' \(first on line 2\)"):
        config.load(path)
    path.write_text("models: [mlp]\nlayouts:\n  a: {framework: single, mesh: [1], mesh: [2]}\n")
    with pytest.raises(ConfigError, match="line 3: duplicate key 'mesh'"):
        config.load(path)


# --- 6. NaN and infinity -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("train", "lr"),
        ("verify", "resume_rtol"),
        ("verify", "resume_rtol_bfloat16"),
        ("run", "cell_timeout_s"),
        ("run", "startup_timeout_s"),
    ],
)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_refused_naming_the_field(section, key, value):
    refused({**small(), section: {key: value}}, f"{section}.{key}: ", "is not a finite number")


def test_nan_in_yaml_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(small()) + "run: {cell_timeout_s: .nan}\n")
    with pytest.raises(ConfigError, match=r"run\.cell_timeout_s: nan is not a finite number"):
        config.load(path)


# --- 7. mesh: [2.0]; seed: 1e23 ----------------------------------------------------------------


def test_float_mesh_sizes_and_steps_are_refused():
    cfg = small()
    cfg["layouts"]["single"]["mesh"] = [1.0]
    refused(cfg, "layouts.single.mesh.0: 1.0 is not an integer")
    refused({**small(), "train": {"steps": 2.0}}, "train.steps: 2.0 is not an integer")


@pytest.mark.parametrize("seed", [1e23, 2**40, 2**63, -1])
def test_seeds_torch_cannot_take_are_refused(seed):
    refused({**small(), "train": {"seed": seed}}, "train.seed")


def test_the_largest_seed_works_in_every_generator():
    from pipeline_lib.models._common import step_generator

    seed = config.load_schema()["properties"]["train"]["properties"]["seed"]["maximum"]
    config.validate({**small(), "train": {"seed": seed}})
    step_generator(seed, 10**9)  # data: seed x 1,000,003 + step
    import torch

    torch.manual_seed(seed + 1_000_003)  # the loader's init


# --- 8. check-config: one line per error, no traceback -----------------------------------------


def test_check_config_prints_one_line_per_error_and_fails(tmp_path):
    path = tmp_path / "bad.yaml"
    cfg = small()
    cfg["layouts"]["x"] = {"framework": "hsdp", "mesh": [2]}
    cfg["train"] = {"lr": -1}
    path.write_text(yaml.safe_dump(cfg))
    proc = procs.run(
        [PYTHON, "-m", "pipeline_lib", "check-config", str(path)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines == [f"{path}: train.lr: -1 is less than or equal to the minimum of 0"], lines
    cfg["train"] = {}
    path.write_text(yaml.safe_dump(cfg))
    proc = procs.run(
        [PYTHON, "-m", "pipeline_lib", "check-config", str(path)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.splitlines() == [
        f"{path}: layouts.x.mesh: framework hsdp needs 2 mesh dim(s) (replicate, shard), got [2]"
    ]


def test_check_config_of_an_unreadable_file_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("models: [mlp\nlayouts: {")
    proc = procs.run(
        [PYTHON, "-m", "pipeline_lib", "check-config", str(path)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"{path}: cannot read config")


# --- 9. the report: unknown statuses, links in reasons ---------------------------------------


def test_report_shows_an_unknown_status_and_escapes_links(tmp_path):
    import pyarrow as pa

    from tests import test_report as fixture

    matrix, tensors = fixture.results_tables()
    status = matrix.column("status").to_pylist()
    reasons = matrix.column("reason").to_pylist()
    status[0], reasons[0] = "quarantined", "see [x](javascript:alert(1)) and ![i](http://t/p.png)"
    status[1], reasons[1] = "error", r"\[y](javascript:alert(2))"
    matrix = matrix.set_column(matrix.schema.get_field_index("status"), "status", pa.array(status))
    matrix = matrix.set_column(matrix.schema.get_field_index("reason"), "reason", pa.array(reasons))
    pq.write_table(matrix, tmp_path / "m.parquet")
    pq.write_table(tensors, tmp_path / "t.parquet")
    from pipeline_lib.results.report import write_report

    write_report(
        str(tmp_path / "m.parquet"), str(tmp_path / "t.parquet"), fixture.CONFIG,
        str(tmp_path / "r.html"), str(tmp_path / "s.md"),
    )  # fmt: skip
    text = (tmp_path / "s.md").read_text()
    assert "1 quarantined" in text
    assert "- 1 cell with status quarantined, which this report does not know" in text
    assert "| quarantined |" in text
    # No bracket that Markdown reads as one: every [ and ] behind an odd number of backslashes.
    assert not re.search(r"(?<!\\)(?:\\\\)*[\[\]]", text.split("## Non-pass cells")[1])
    assert r"\[x\](javascript:alert(1))" in text and r"\\\[y\](javascript:alert(2))" in text
    assert "quarantined" in (tmp_path / "r.html").read_text()


# --- 11. writes: fsync, temporary files, the two Parquet files, selftest.ok ------------------


def test_atomic_write_flushes_file_and_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic.write_json(tmp_path / "r.json", {"a": 1})
    assert len(synced) == 2 and synced[1] == str(tmp_path)
    assert Path(synced[0]).name.startswith(".r.json.")  # the file, before its rename


def test_a_failed_write_leaves_no_temporary_and_the_old_file(tmp_path):
    target = tmp_path / "r.json"
    atomic.write_json(target, {"old": True})

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic.write_with(target, fail)
    assert json.loads(target.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_a_temporary_left_by_sigkill_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "r.json"
    code = (
        "import os, signal, sys; from pipeline_lib.common import atomic\n"
        "def die(tmp):\n    tmp.write_text('half'); os.kill(os.getpid(), signal.SIGKILL)\n"
        f"atomic.write_with({str(target)!r}, die)\n"
    )
    proc = procs.run([PYTHON, "-c", code], cwd=REPO, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert len(atomic.stale_temporaries(target)) == 1 and not target.exists()
    atomic.write_json(target, {"new": True})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def _records(tmp_path: Path) -> list[str]:
    from tests.test_report import results_tables

    matrix, tensors = results_tables()
    paths = []
    for i, cell in enumerate(matrix.to_pylist()[:4]):
        rows = [r for r in tensors.to_pylist() if r["model"] == cell["model"]][:2]
        path = tmp_path / f"rec{i}.json"
        path.write_text(json.dumps({"cells": [cell], "tensors": rows}))
        paths.append(str(path))
    return paths


def test_matrix_and_tensors_carry_one_token_and_a_torn_pair_is_refused(tmp_path, monkeypatch):
    from pipeline_lib.results import aggregate

    matrix, tensors = str(tmp_path / "matrix.parquet"), str(tmp_path / "tensors.parquet")
    records = _records(tmp_path)
    aggregate.aggregate(records, matrix, tensors, git_commit="x")
    token = aggregate.results_token(matrix, tensors)
    assert token and len(token) == 32
    # A kill between the two renames: the new matrix beside the old tensors.
    real, calls = os.replace, []

    def replace_then_die(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill between the renames
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        aggregate.aggregate(records, matrix, tensors, git_commit="y")
    monkeypatch.setattr(atomic.os, "replace", real)
    assert pq.read_table(matrix).column("git_commit")[0].as_py() == "y"
    with pytest.raises(ValueError, match="different aggregate runs"):
        aggregate.results_token(matrix, tensors)
    from pipeline_lib.results.report import write_report
    from tests.test_report import CONFIG

    with pytest.raises(ValueError, match="different aggregate runs"):
        write_report(matrix, tensors, CONFIG, str(tmp_path / "r.html"), str(tmp_path / "s.md"))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_selftest_ok_is_written_atomically(tmp_path, monkeypatch):
    import pandas as pd

    from pipeline_lib.results import selftest

    table = tmp_path / "t.parquet"
    pd.DataFrame([{c: "x" for c in selftest.COLUMNS} | {"caught": True}]).to_parquet(table)
    real = Path.write_text

    def half_then_full_disk(self, data, *args, **kwargs):
        real(self, data[:3], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_full_disk)
    with pytest.raises(OSError, match="No space"):
        selftest.check(str(table), str(tmp_path / "selftest.ok"))
    monkeypatch.setattr(Path, "write_text", real)
    assert not (tmp_path / "selftest.ok").exists()
    assert selftest.check(str(table), str(tmp_path / "selftest.ok")) == 0
    assert (tmp_path / "selftest.ok").read_text() == "all 1 faults caught\n"


# --- 12. disk: an estimate, a refusal, ENOSPC as a reason ------------------------------------


def test_builtin_model_sizes_match_the_models():
    from pipeline_lib import models
    from pipeline_lib.plan.disk_estimate import BUILTIN_STATE

    assert set(BUILTIN_STATE) == set(models.names())
    for name, expected in BUILTIN_STATE.items():
        module = models.get(name).build()
        params, buffers = list(module.parameters()), list(module.buffers())
        actual = (sum(p.numel() for p in params), len(params),
                  sum(b.numel() for b in buffers), len(buffers))  # fmt: skip
        assert actual == expected, name


def test_check_config_and_the_dry_run_print_the_disk_estimate(tmp_path):
    cfg = {**small(), "torch_versions": {"t": "torch==2.13.0"}, "format": ["dcp", "torch_save"]}
    cfg["run"] = {"torch_env_dir": str(tmp_path / "envs")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = procs.run(
        [PYTHON, "-m", "pipeline_lib", "check-config", str(tmp_path / "c.yaml")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.splitlines()[1]
    assert "the grid writes about" in line
    for part in ("checkpoints", "references", "conversions", "records", "environments"):
        assert part in line
    proc = dry_run(tmp_path, cfg)
    assert proc.stderr.count("dcp-matrix: the grid writes about") == 1


def test_the_estimate_covers_what_a_save_item_writes():
    """Measured: the transformer saved under fsdp2_2 (2026-12-02) wrote a 582 kB checkpoint
    and a 321 kB reference; torch_save's conversion 282 kB."""
    from pipeline_lib.plan.axes import DEFAULT, Variant
    from pipeline_lib.plan.disk_estimate import save_item_bytes

    estimate = save_item_bytes("transformer", DEFAULT, 2)
    assert 582_197 <= estimate.parts["checkpoints"] <= 2 * 582_197
    assert 320_830 <= estimate.parts["references"] <= 2 * 320_830
    conv = save_item_bytes("transformer", Variant(format="torch_save"), 2)
    assert 281_909 <= conv.parts["conversions"] <= 2 * 281_909
    sealed = save_item_bytes("transformer", DEFAULT, 2, sealed=True)  # a seal, no reference
    assert "references" not in sealed.parts and 0 < sealed.parts["seals"] < 1024
    assert sealed.parts["checkpoints"] == estimate.parts["checkpoints"]
    cfg = config.validate({**small(), "verify": {"reference": "sealed"}})
    job = disk_estimate.job_bytes(grid.save_job_spec(cfg, "results", "single"))
    assert "references" not in job.parts and job.parts["seals"] > 0


def test_a_save_job_without_room_writes_an_error_record_per_item(in_tmp, monkeypatch):
    cfg = config.validate({**small(), "models": ["mlp", "transformer"]})
    spec = grid.save_job_spec(cfg, "results", "single")
    monkeypatch.setattr(
        shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000)
    )
    monkeypatch.setattr(driver, "run_units", lambda *a: pytest.fail("launched without room"))
    driver.run_save_job(spec)
    for item in spec.items:
        record = read_checked(item.record, SaveRecord)
        assert record.status == "error"
        assert record.reason.startswith("not enough disk space: the save job of single needs")
        assert "1000 B free on the filesystem of results/work/save/single" in record.reason


def test_enospc_names_the_path_and_the_free_space(tmp_path):
    from pipeline_lib.common.errors import one_line

    exc = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x" / "y.pt"))
    reason = one_line(exc)
    assert reason.startswith("OSError: [Errno 28] No space left on device")
    assert f"free on the filesystem of {tmp_path / 'x' / 'y.pt'}" in reason
    assert "disk full: " in reason
    from torch.distributed.checkpoint import CheckpointException

    wrapped = CheckpointException("save", {1: (exc, "tb")})
    assert one_line(wrapped).startswith("CheckpointException on rank(s) [1]: OSError")
    assert "disk full" in one_line(wrapped)


@pytest.fixture
def tiny_fs(tmp_path):
    """A 3 MB tmpfs (root only), unmounted afterwards."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    proc = procs.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                     capture_output=True, timeout=60)  # fmt: skip
    if proc.returncode:
        reason = f"cannot mount a tmpfs: {proc.stderr.decode().strip()}"
        # CI runs as root: there the full-disk test must run, not skip.
        (pytest.fail if os.environ.get("CI") else pytest.skip)(reason)
    yield mount
    import gc

    gc.collect()  # a failed torch.save may hold its file open until collected
    if procs.run(["umount", str(mount)], timeout=60).returncode:
        procs.run(["umount", "-l", str(mount)], check=True, timeout=60)


def test_a_full_disk_in_a_torch_save_is_a_reason_naming_the_file(tiny_fs):
    import torch

    from pipeline_lib.common.errors import one_line

    atomic.write_json(tiny_fs / "done.json", {"kept": True})
    target = tiny_fs / "rank-0.pt"
    with pytest.raises(OSError) as info:
        atomic.write_with(target, lambda tmp: torch.save(torch.zeros(2_000_000), tmp))
    reason = one_line(info.value)
    assert f"writing {target}" in reason and "disk full: " in reason, reason
    assert f"free on the filesystem of {target}" in reason
    assert json.loads((tiny_fs / "done.json").read_text()) == {"kept": True}
    assert sorted(p.name for p in tiny_fs.iterdir()) == ["done.json"]  # no temporary left


# --- 10. what a config may execute; what a checkpoint folder may hold --------------------------


def check_config(path: Path) -> tuple[int, str, str]:
    """``check-config path`` in this process: (exit status, stdout, stderr)."""
    import contextlib
    import io

    from pipeline_lib import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(["check-config", str(path)])
            status = 0
        except SystemExit as exc:
            status = exc.code
    return status, out.getvalue(), err.getvalue()


def with_checkpoint(folder: Path, **entry) -> dict:
    """small() loading the existing checkpoint ``folder`` (its .metadata is not read here)."""
    folder.mkdir(exist_ok=True)
    if not (folder / ".metadata").exists():
        (folder / ".metadata").write_bytes(b"not read by the config check")
    return {**small(), "pairs": "none",
            "checkpoints": {"ck": {"path": str(folder), "model": "mlp", **entry}}}  # fmt: skip


MINE = """\
from os import system


class Thing:
    pass


def two(entry, other):
    return entry


def ours(entry):
    return "model." + entry
"""


@pytest.mark.parametrize(
    ("naming", "why"),
    [
        ("os:system", "'os' is part of Python, not your own module"),
        ("builtins:eval", "'builtins' is part of Python, not your own module"),
        ("shutil:rmtree", "shutil.py) is part of the standard library, not your own module"),
        ("yaml:safe_load", "is an installed package, not your own module"),
        ("pipeline_lib.common.atomic:write_text", "atomic.py) is part of dcp-matrix, not your own module"),
        ("mine_namings:system", "mine_namings:system is not a plain function: it must be defined with def (no decorator) at the top level of"),
        ("mine_namings:Thing", "mine_namings:Thing is not a plain function"),
        ("mine_namings:two", "mine_namings:two takes (entry, other): a naming takes exactly one positional parameter, the entry name"),
    ],
)  # fmt: skip
def test_a_naming_that_is_not_a_function_of_your_own_is_refused(in_tmp, naming, why):
    (in_tmp / "mine_namings.py").write_text(MINE)
    path = in_tmp / "c.yaml"
    path.write_text(yaml.safe_dump(with_checkpoint(in_tmp / "ck", naming=naming)))
    status, _, err = check_config(path)
    assert status == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(f"{path}: checkpoints.ck.naming: ") and why in err, err


def test_check_config_runs_no_naming_module_the_job_does(in_tmp):
    """A naming's module is read, not imported, by the config check; the import job imports it
    (then checks what it made: a plain function of one parameter)."""
    from pipeline_lib.verify.checkpoint_names import Naming

    (in_tmp / "side_effect_naming.py").write_text(
        "open('IMPORTED', 'w').close()\n\n\ndef ours(entry):\n    return 'model.' + entry\n"
    )
    path = in_tmp / "c.yaml"
    path.write_text(
        yaml.safe_dump(with_checkpoint(in_tmp / "ck", naming="side_effect_naming:ours"))
    )
    status, out, err = check_config(path)
    assert (status, err) == (0, "") and "valid" in out
    assert not (in_tmp / "IMPORTED").exists()
    assert Naming("side_effect_naming:ours").ours("w") == "model.w"
    assert (in_tmp / "IMPORTED").exists()


def test_check_config_imports_your_model_module_and_nothing_else(in_tmp):
    """A model by import path is imported (and built on the meta device) by the config check, as
    docs/config.md says; a module that is not your own is refused unimported (``this`` prints
    the Zen of Python when imported)."""
    (in_tmp / "side_effect_model.py").write_text(
        "import torch\n\nopen('IMPORTED', 'w').close()\n\n\ndef build():\n"
        "    return torch.nn.Linear(2, 2)\n\n\ndef make_inputs(batch_size, generator):\n"
        "    return torch.randn(batch_size, 2, generator=generator)\n"
    )
    cfg = {**small(), "models": ["mlp", "this:build", "side_effect_model:build"]}
    path = in_tmp / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    status, out, err = check_config(path)
    assert "Beautiful is better than ugly" not in out + err
    assert status == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(f"{path}: models.1: 'this' (/") and err.endswith(
        "this.py) is part of the standard library, not your own module\n"
    )
    assert (in_tmp / "IMPORTED").exists()


def test_a_model_that_is_not_your_own_is_refused():
    refused({**small(), "models": ["os:abort"]}, "models.0: 'os' is part of Python")
    refused({**small(), "models": ["torch.nn:Linear"]}, "models.0: 'torch.nn' (", "is an installed")


def test_an_hf_base_class_is_a_one_line_config_error():
    for base in ("PreTrainedModel", "LlamaPreTrainedModel"):
        cfg = {**small(), "models": ["x"], "hf_models": {"x": {"architecture": base}}}
        message = refused(cfg, f"hf_models.x.architecture: {base} is a base class of transformers'")
        assert len(config.error_lines(ConfigError(message))) == 1


def test_a_checkpoint_folder_snakemake_cannot_take_is_refused_before_any_job(tmp_path):
    """A file named with braces (Snakemake read it as a wildcard: the dry run aborted with
    WildcardError), a .metadata linked out of the folder or not a regular file."""
    braces = tmp_path / "braces"
    cfg = with_checkpoint(braces, path="braces")
    (braces / "step{1}.txt").write_text("")
    proc = dry_run(tmp_path, cfg, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "WildcardError" not in output
    assert (
        "checkpoints.ck.path: 'braces' holds a file whose name has { or }, step{1}.txt: "
        "Snakemake would read it as a wildcard (rename or move it)" in output
    ), output
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / ".metadata").symlink_to(tmp_path / "braces" / ".metadata")
    refused(
        with_checkpoint(linked), f"its .metadata is a link to '{braces / '.metadata'}', outside"
    )
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / ".metadata")
    refused(with_checkpoint(fifo), "checkpoints.ck.path: ", "its .metadata is not a regular file")


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        ("while True:\n        pass", "timeout", "no progress for 2 s during placing the entries "
         "(the naming); import killed"),
        ("import os, signal\n    os.kill(os.getpid(), signal.SIGKILL)", "crash",
         "import killed by SIGKILL during placing the entries (the naming)"),
    ],
)  # fmt: skip
def test_the_import_job_runs_under_a_watchdog(in_tmp, body, status, reason):
    """A naming of your own that loops, or kills its process: the import job writes its record
    (it hung, or died without one)."""
    from tests.test_untrusted import save, state

    (in_tmp / "stuck_naming.py").write_text(f"def ours(entry):\n    {body}\n")
    save(in_tmp / "ck", state())
    raw = with_checkpoint(in_tmp / "ck", naming="stuck_naming:ours")
    cfg = config.validate({**raw, "run": {"cell_timeout_s": 2}})
    proc = procs.run(
        [PYTHON, "-m", "pipeline_lib", "import-checkpoint", "--grid", json.dumps(cfg), "--name",
         "ck"], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = read_checked(grid.existing_record_path("ck"), ImportRecord)
    assert (record.status, record.reason) == (status, reason)
    assert record.existing and record.checkpoint == str(in_tmp / "ck")


def test_reasons_are_one_printable_line():
    """Entry names and messages from a checkpoint may hold newlines and terminal escapes: every
    reason shows them escaped, on one line (the gate prints reasons, a CI reads its lines)."""
    from pipeline_lib.common.errors import one_line
    from pipeline_lib.common.layout import Layout
    from pipeline_lib.verify.records import verdict
    from pipeline_lib.verify.results import EntryComparison, ImportRecord, LoadResult

    hostile = "w\n::error title=x::y\x1b[2J\u202e\t"
    shown = "w\\n::error title=x::y\\x1b[2J\\u202e\\t"
    where = {"model": "mlp", "layout": Layout.existing("x"), "checkpoint": "x", "reference": "r",
             "config_hash": "h", "created_at": "t", "torch_version": "2.13", "source_folder": "x"}  # fmt: skip
    save = ImportRecord(status="ok", reason="", files_check={}, resume_losses=[], **where)
    missing = EntryComparison(False, None, "missing in the loader's state")
    load = LoadResult(status="ok", reason="", resume_losses=[], entries={hostile: missing})
    assert verdict(save, load, 1e-5) == (
        "fail", f"loader vs saver: 1 of 1 entries differ; first {shown}: missing in the loader's "
        "state")  # fmt: skip
    failed = ImportRecord(status="error", reason=f"reading x: {hostile}", **where)
    assert verdict(failed, load, 1e-5) == ("error", f"import: reading x: {shown}")
    assert one_line(RuntimeError("x\x1b[2J\u202ey")) == "RuntimeError: x\\x1b[2J\\u202ey"
    assert one_line(KeyError(hostile)) == f"KeyError: {hostile!r}"  # repr: escaped already
    assert one_line(ValueError(f"entry {hostile} refused")) == "ValueError: entry w"

    from pipeline_lib.common.errors import printable

    assert printable(hostile) == shown and printable(shown) == shown
