"""Generated hostile checkpoint folders (hypothesis) fed to the import job and to a load cell.

Each folder starts as a real DCP checkpoint (``dcp.save`` in this process, no process group) and
is then edited by hand, never through pipeline code: entries renamed to names holding newlines,
terminal escapes, quotes and braces; sizes, offsets and lengths declared far from what the files
hold; special files (a FIFO as a data file or as ``.metadata``, a link out of the folder, a
sparse file of SPARSE_BYTES); a ``.metadata`` pickle that would run a command; a naming that is
not the user's own function (``os:system``, ``builtins:eval``, ``shutil:rmtree``, named in the
spec directly, past the config check), with entries named like the commands it would run.

Every import runs in a child process forked by a runner that imported torch once (a fork per
folder: a fresh process, killed at IMPORT_DEADLINE_S; its growth is the peak RSS ``wait4``
reports less its RSS when it started). Each
gives a record ``ok`` or ``error`` whose reason is one printable line; a folder with anything
but renamed entries gives ``error``. Nothing outside the folder is opened (an audit hook on
``open`` in the child), nothing is run (no marker file appears, the folder ``shutil:rmtree``
would delete is still there), no import outlives its deadline and none grows its process by more
than RSS_GROWTH_MAX_MB. A few folders then go through one load job (one torchrun launch): each
cell is ``error`` (its import failed) or ``fail`` (the load cannot place the renamed entries),
its reason one printable line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeline_lib.verify.results import ImportRecord, LoadRecord
from tests import procs
from tests.conftest import REPO
from tests.record_schemas import read_checked

SPARSE_BYTES = 5 * 2**30 // 4  # 1.25 GiB: above every bound a read has (1 GiB of .metadata)
IMPORT_DEADLINE_S = 60  # generous on a loaded 2-core machine (measured: under 1 s each)
RSS_GROWTH_MAX_MB = 200
EXAMPLES = 40
HOSTILE = "\n\r\t\x1b\x00\x7f\u2028\u202e'\"{}[]*$;: /\\."
NAMES = st.text(st.sampled_from(HOSTILE + "abcmodel"), min_size=1, max_size=10)
SPECIAL = (None, "fifo_data", "fifo_metadata", "link_data_out", "link_metadata_out",
           "sparse_data", "sparse_metadata")  # fmt: skip
FOREIGN = ("os:system", "builtins:eval", "shutil:rmtree")
EDITS = ("tensor_1e6", "length_huge", "length_1", "offset_negative", "offset_huge")
COUNTS: dict[str, int] = {}

# The runner: imports torch and the import job once, then forks one child per folder (a line
# of JSON on stdin); the child imports with an audit hook on open, the runner reaps it with
# wait4 (its peak RSS) or kills it at the deadline, and answers a line of JSON.
RUNNER = textwrap.dedent("""
    import json, os, signal, sys, time, warnings
    import psutil
    warnings.simplefilter("ignore")
    from pipeline_lib.job.existing import import_checkpoint
    from pipeline_lib.plan.specs import ExistingSpec

    def child(job):
        start_rss = psutil.Process().memory_info().rss
        outside = os.path.realpath(job["outside"])
        opened = []

        def hook(event, args):
            if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
                path = os.path.realpath(os.fsdecode(args[0]))
                if path.startswith(outside + os.sep) and path not in opened:
                    opened.append(path)

        sys.addaudithook(hook)
        os.chdir(job["work"])
        import_checkpoint(ExistingSpec.from_dict(job["spec"]))
        with open(os.path.join(job["work"], "child.json"), "w") as f:
            json.dump({"opened": opened, "start_rss": start_rss}, f)

    for line in sys.stdin:
        job = json.loads(line)
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            try:
                child(job)
                os._exit(0)
            except BaseException as exc:
                print(repr(exc), file=sys.stderr)
                os._exit(3)
        hung = False
        while True:
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() - start > job["deadline"]:
                os.kill(pid, signal.SIGKILL)
                hung = True
            time.sleep(0.02)
        print(json.dumps({"seconds": time.monotonic() - start, "hung": hung,
                          "exit": os.waitstatus_to_exitcode(status),
                          "peak_rss_mb": usage.ru_maxrss / 1024}), flush=True)
""")


class RunsCode:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@st.composite
def plans(draw) -> dict:
    """What to do to the checkpoint: renames, size edits, a special file, a pickle, a naming."""
    return {
        "renames": draw(st.lists(st.tuples(st.integers(0, 99), NAMES), max_size=3)),
        "sizes": draw(st.lists(st.tuples(st.integers(0, 99), st.sampled_from(EDITS)), max_size=2)),
        "special": draw(st.sampled_from(SPECIAL)),
        "pickle": draw(st.booleans()),
        "naming": draw(st.sampled_from(("dcp_matrix",) * 4 + ("torchtitan", *FOREIGN))),
    }


NAMES_ONLY = {"renames": [(0, "\x1b[2J\n::error title=x::{y}'\"")], "sizes": [], "special": None,
              "pickle": False, "naming": "dcp_matrix"}  # fmt: skip


# Each special file and each size edit at least once, with a naming that lets the reader reach it.
EXAMPLES_EACH = [
    {**NAMES_ONLY, "renames": [(1, "n\x1b[0m{}")], "special": special} for special in SPECIAL[1:]
] + [{**NAMES_ONLY, "renames": [], "sizes": [(3, edit)]} for edit in EDITS]


def with_examples(test):
    """``test`` with NAMES_ONLY and EXAMPLES_EACH as explicit examples (run first, as listed)."""
    for plan in reversed([NAMES_ONLY, *EXAMPLES_EACH]):
        test = example(plan)(test)
    return test


def must_fail(plan: dict) -> bool:
    """Whether the import must be ``error``: anything but renamed entries."""
    return bool(plan["sizes"] or plan["special"] or plan["pickle"] or plan["naming"] in FOREIGN)


def base_checkpoint(path: Path) -> None:
    """A real checkpoint of the built-in mlp (the load cells build it) and a parameter group."""
    import torch
    import torch.distributed.checkpoint as dcp

    from pipeline_lib import models

    torch.manual_seed(0)
    model = models.get("mlp").build()
    state = {"model": model.state_dict(),
             "optim": {"param_groups": [{"lr": 0.01, "params": list(model.state_dict())}]}}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=str(path), no_dist=True)


def hostile_folder(base: Path, folder: Path, outside: Path, plan: dict, markers: Path) -> None:
    """A copy of ``base`` with ``plan`` applied by hand (pickle, files, links)."""
    shutil.copytree(base, folder)
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    entries = sorted(metadata.state_dict_metadata)
    commands = _commands(plan["naming"], markers)
    renames = [(i, name) for i, name in plan["renames"]] + list(enumerate(commands))
    for i, name in renames:
        _rename(metadata, entries[i % len(entries)], name)
        entries = sorted(metadata.state_dict_metadata)
    for i, edit in plan["sizes"]:
        _edit_size(metadata, entries[i % len(entries)], edit, folder)
    if plan["pickle"]:
        metadata.planner_data = RunsCode(markers / "pickle")
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    _special(plan["special"], folder, outside, metadata)


def _commands(naming: str, markers: Path) -> list[str]:
    """Entry names that create a marker (or delete the markers folder) when a naming runs them."""
    return {
        "os:system": [f"/usr/bin/touch {markers / 'system'}"],
        "builtins:eval": [f"open({str(markers / 'eval')!r}, 'w')"],
        "shutil:rmtree": [str(markers)],
    }.get(naming, [])


def _rename(metadata, old: str, new: str) -> None:
    if new in metadata.state_dict_metadata:
        return
    metadata.state_dict_metadata[new] = metadata.state_dict_metadata.pop(old)
    data = metadata.storage_data
    for index in [i for i in data if i.fqn == old]:
        data[dataclasses.replace(index, fqn=new)] = data.pop(index)
    if metadata.planner_data and old in metadata.planner_data:
        metadata.planner_data[new] = metadata.planner_data.pop(old)


def _edit_size(metadata, entry: str, edit: str, folder: Path) -> None:
    import torch
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = metadata.state_dict_metadata[entry]
    if edit == "tensor_1e6" and isinstance(meta, TensorStorageMetadata):
        meta.size = torch.Size([meta.size[0] * 10**6, *meta.size[1:]] if meta.size else [10**6])
        return
    index = next(i for i in metadata.storage_data if i.fqn == entry)
    info = metadata.storage_data[index]
    size = (folder / info.relative_path).stat().st_size
    changed = {"length_huge": {"length": size * 1000}, "length_1": {"length": 1},
               "offset_negative": {"offset": -7}, "offset_huge": {"offset": 2**40},
               "tensor_1e6": {"length": info.length * 10**6}}[edit]  # fmt: skip
    metadata.storage_data[index] = dataclasses.replace(info, **changed)


def _special(special: str | None, folder: Path, outside: Path, metadata) -> None:
    data = folder / next(iter(metadata.storage_data.values())).relative_path
    if special == "fifo_data":
        data.unlink()
        os.mkfifo(data)
    elif special == "fifo_metadata":
        (folder / ".metadata").unlink()
        os.mkfifo(folder / ".metadata")
    elif special in ("link_data_out", "link_metadata_out"):
        inside = data if special == "link_data_out" else folder / ".metadata"
        target = outside / f"{folder.name}-{inside.name}"
        shutil.move(inside, target)
        inside.symlink_to(target)
    elif special == "sparse_data":
        with open(data, "r+b") as f:
            f.truncate(SPARSE_BYTES)  # a hole: no disk, zeros when read
        for index, info in list(metadata.storage_data.items()):
            if info.relative_path == data.name:
                length = SPARSE_BYTES - info.offset
                metadata.storage_data[index] = dataclasses.replace(info, length=length)
        (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    elif special == "sparse_metadata":
        with open(folder / ".metadata", "r+b") as f:
            f.truncate(SPARSE_BYTES)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen([sys.executable, "-c", RUNNER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env,
                            cwd=tmp_path_factory.mktemp("runner"))  # fmt: skip
    yield proc
    proc.stdin.close()
    proc.wait(timeout=60)


def imported(runner, plan: dict, tmp_path: Path, base: Path, outside: Path) -> dict:
    """A hostile folder made from ``base`` by ``plan``, imported by the runner's child: the
    import's record, and what the runner and the child measured."""
    n = COUNTS["imports"] = COUNTS.get("imports", 0) + 1
    folder, work, markers = (
        tmp_path / f"folder-{n}",
        tmp_path / f"work-{n}",
        tmp_path / f"markers-{n}",
    )
    for made in (work, markers):
        made.mkdir()
    hostile_folder(base, folder, outside, plan, markers)
    spec = {"name": "hostile", "path": str(folder), "model": "mlp", "naming": plan["naming"],
            "save_dir": "results/existing/hostile", "reference": "results/existing/hostile/reference",
            "record": "results/existing/hostile.json", "config_hash": "x"}  # fmt: skip
    job = {"spec": spec, "work": str(work), "outside": str(outside), "deadline": IMPORT_DEADLINE_S}
    runner.stdin.write(json.dumps(job) + "\n")
    runner.stdin.flush()
    result = json.loads(runner.stdout.readline())
    assert not result["hung"] and result["exit"] == 0, (plan, result)
    child = json.loads((work / "child.json").read_text())
    growth = result["peak_rss_mb"] - child["start_rss"] / 2**20
    record = read_checked(work / spec["record"], ImportRecord)
    return {**result, **child, "growth_mb": growth, "record": record, "markers": markers,
            "folder": folder}  # fmt: skip


def one_printable_line(reason: str) -> bool:
    return reason.isprintable() and "\n" not in reason


def test_hostile_folders_give_an_error_record_and_nothing_else(runner, tmp_path, monkeypatch):
    base, outside, kept = tmp_path / "base", tmp_path / "outside", {}  # {NAMES_ONLY?: folder}
    base_checkpoint(base)
    outside.mkdir()
    worst = {"seconds": 0.0, "growth_mb": 0.0}
    started = time.monotonic()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @with_examples
    @given(plans())
    def check(plan):
        found = imported(runner, plan, tmp_path, base, outside)
        status, reason = found["record"].status, found["record"].reason
        assert status in ("ok", "error") and (status == "error" or not must_fail(plan)), plan
        assert one_printable_line(reason), reason
        assert found["opened"] == [], plan  # nothing outside the folder opened
        assert found["markers"].is_dir() and not list(found["markers"].iterdir()), plan
        assert found["growth_mb"] < RSS_GROWTH_MAX_MB, (plan, found)
        worst.update({key: max(worst[key], found[key]) for key in worst})
        for key in (status, plan["special"], plan["naming"], *(e for _, e in plan["sizes"])):
            COUNTS[str(key)] = COUNTS.get(str(key), 0) + 1
        if plan == NAMES_ONLY or (must_fail(plan) and configurable(plan)):
            kept[plan == NAMES_ONLY] = kept.get(plan == NAMES_ONLY) or found["folder"]

    check()
    print(f"\nhostile folders: {COUNTS}, slowest import {worst['seconds']:.2f} s, largest RSS "
          f"growth {worst['growth_mb']:.0f} MB, {time.monotonic() - started:.0f} s in all")  # fmt: skip
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    load_cells(list(kept.values()), tmp_path / "loads")
    print(f"load cells of {len(kept)} folders: {time.monotonic() - started:.0f} s")


def configurable(plan: dict) -> bool:
    """Whether a config may name the folder (the config check refuses a .metadata that is not
    a regular file inside it, and a naming that is not the user's own)."""
    return plan["naming"] == "dcp_matrix" and plan["special"] not in ("fifo_metadata",
                                                                      "link_metadata_out")  # fmt: skip


def load_cells(folders: list[Path], work: Path) -> None:
    """One load job (layout single: one torchrun launch) over ``folders``, each imported first
    through the import job's command (its watchdog): every cell ``error`` or ``fail``, its
    reason one printable line, and the renamed entry of NAMES_ONLY named, escaped."""
    from pipeline_lib.plan import config, grid
    from tests.jobs import cli

    work.mkdir()
    raw = {"models": ["mlp"], "layouts": {"single": {"framework": "single", "mesh": [1]}},
           "pairs": "none", "run": {"cell_timeout_s": 120},
           "checkpoints": {f"h{i}": {"path": str(f), "model": "mlp"} for i, f in enumerate(folders)}}  # fmt: skip
    cfg = config.validate(raw)
    os.chdir(work)
    for name in cfg["checkpoints"]:
        proc = procs.run(
            [sys.executable, "-m", "pipeline_lib", "import-checkpoint", "--grid", json.dumps(cfg),
             "--name", name], capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
    spec = grid.load_job_spec(cfg, grid.RESULTS, "single")
    cli("load", spec)
    cells = [c for item in spec.items for c in read_checked(item.record, LoadRecord).cells]
    assert len(cells) == len(folders)
    for cell in cells:
        assert cell["status"] in ("error", "fail"), cell
        assert one_printable_line(cell["reason"]), cell["reason"]
    assert any("\\x1b[2J\\n::error title=x::{y}" in c["reason"] for c in cells), cells
