"""Reproducers (pipeline_lib.results.reproducer): a standalone script per cell that does not pass, made
of the pipeline's own code (pipeline_lib.results.inline), run in a fresh folder without pipeline_lib.
Cells known on torch 2.13.0 CPU: docs/findings.md."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest

from pipeline_lib.job import launcher
from pipeline_lib.plan import config as config_mod
from pipeline_lib.plan import grid
from pipeline_lib.plan.axes import AXES, DEFAULT, Variant
from pipeline_lib.results import baseline, inline, reproducer, reproducer_run
from pipeline_lib.verify.records import CELL_KEYS
from pipeline_lib.verify.results import EntryComparison, LoadRecord
from tests import procs
from tests.conftest import REPO
from tests.jobs import cli, cli_all
from tests.record_schemas import read_checked

CONFIG = {
    "models": ["mlp", "tied_embedding", "transformer"],
    "layouts": {
        "single": {"framework": "single", "mesh": [1]},
        "ddp_2": {"framework": "ddp", "mesh": [2]},
        "fsdp1_2": {"framework": "fsdp1", "mesh": [2]},
        "fsdp1_flat_2": {"framework": "fsdp1_flat", "mesh": [2]},
        "pp_2": {"framework": "pp", "mesh": [2], "schedule": "gpipe", "microbatches": 4},
    },
    "format": ["dcp", "safetensors", "safetensors_consolidated"],
    "mode": ["sharded", "full"],
    "combine_axes": "one_at_a_time",
    "run": {"cell_timeout_s": 120},
}
# One cell of each kind of verdict (docs/findings.md), all loaded into single: (variant, model,
# save layout) -> the status and what the reason names.
CELLS = {
    # rank 0 SIGSEGV in get_state_dict(full_state_dict=True, cpu_offload=True)
    "crash": (Variant(mode="full"), "mlp", "fsdp1_2", "crash", "killed by SIGSEGV"),
    # the consolidated file holds other ranks' 0-dim optimizer step as 0 (any saver of 2
    # ranks; this one saves the PP cell's checkpoint too: one save job for both)
    "bytes": (
        Variant(format="safetensors_consolidated"),
        "transformer",
        "pp_2",
        "fail",
        "bytes differ",
    ),
    # HuggingFaceStorageWriter refuses tensors that share memory
    "error": (Variant(format="safetensors"), "tied_embedding", "single", "error", "share memory"),
    # a PP checkpoint holds one stage's optim.param_groups.0.params
    "pp": (DEFAULT, "transformer", "pp_2", "fail", "optim.param_groups.0.params"),
    # FSDP1 use_orig_params=False: one FlatParameter's original parameters share one step
    "flat": (DEFAULT, "mlp", "fsdp1_flat_2", "fail", "shares storage"),
}
PWNED = 'x"""; __import__("os").system("touch PWNED"); """'


def row(model="mlp", save="ddp_2", load="single", status="fail", reason="r", **key) -> dict:
    """A matrix row of the cell key, its status and reason."""
    found = {"model": model, "save_layout": save, "load_layout": load, "status": status}
    found |= {"reason": reason, "save_torch_version": "2.13.0", "load_torch_version": "2.13.0"}
    return {**found, **DEFAULT.to_dict(), **key}


def config() -> dict:
    return config_mod.validate(CONFIG)


# --- names ------------------------------------------------------------------------------------
def test_a_cell_name_changes_with_every_key_column_and_stays_path_safe(monkeypatch):
    base = row(save="fsdp1_2", load="fsdp1_2", mode="full")
    other = {"model": "transformer", "save_layout": "ddp_2", "load_layout": "single"}
    other |= {"save_torch_version": "2.14.1", "load_torch_version": "2.14.1"}
    other |= {axis: values[-1] for axis, values in AXES.items()}
    names = {reproducer.cell_name(base)}
    for key in CELL_KEYS:
        names.add(reproducer.cell_name({**base, key: other[key]}))
    assert len(names) == len(CELL_KEYS) + 1
    # the torch versions of a cross-release run (folder names that collided before)
    crossed = {**base, "load_torch_version": "2.14.1"}
    assert reproducer.cell_name(crossed) == "mode-full.mlp.fsdp1_2.fsdp1_2.torch-2.13.0-2.14.1"
    # a row of an older matrix, without the newer axis columns: as their defaults
    older = {k: v for k, v in crossed.items() if k not in ("load_process", "save_sequence")}
    assert reproducer.cell_name(older) == reproducer.cell_name(crossed)
    # a key column added later is part of the name too
    monkeypatch.setattr(reproducer, "CELL_KEYS", [*CELL_KEYS, "device"])
    assert reproducer.cell_name({**base, "device": "cuda"}) != reproducer.cell_name(base)
    # anything a crafted matrix may hold: one path component, and no two keys share it
    odd = [{**base, "model": m} for m in ("../../x", "a/b", "a_b", ".", "a.b", "x" * 300)]
    odd.append({**base, "model": "a", "save_layout": "b.fsdp1_2"})  # as "a.b", "fsdp1_2"
    odd_names = [reproducer.cell_name(r) for r in odd]
    assert len(set(odd_names)) == len(odd)
    for name in odd_names:
        assert "/" not in name and name not in (".", "..") and len(name.encode()) <= 255


# --- what a script holds ----------------------------------------------------------------------
def test_a_script_holds_values_as_data_never_as_code(tmp_path):
    """A reason edited under results/ (or a crafted matrix) ends up in the script as a string
    literal: nothing in it runs, a ``\\u`` compiles, and running the script makes no file."""
    reasons = [PWNED, "bad \\u escape \\N{x}", "two\nlines\r''' \\", "\x00\u2028'\"#"]
    cells = [row(reason=r) for r in reasons] + [row(status=PWNED)]
    for cell in cells:
        text = reproducer.script(cell, config())
        tree = ast.parse(text)  # compiles
        calls = {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
        assert not any("__import__" in c or c.endswith(".system") for c in calls)
        cell_value = next(
            ast.literal_eval(n.value)
            for n in tree.body
            if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "CELL"
        )
        assert (cell_value["reason"], cell_value["status"]) == (cell["reason"], cell["status"])
    (tmp_path / "repro.py").write_text(reproducer.script(row(reason=PWNED), config()))
    proc = procs.run(
        [sys.executable, "repro.py", "--help"], cwd=tmp_path, env=_no_package(),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0 and "usage: python repro.py" in proc.stderr
    assert not (tmp_path / "PWNED").exists()


def test_models_and_layouts_come_from_the_config_never_from_the_matrix(tmp_path):
    """``python -m pipeline_lib reproducers`` on a crafted matrix: a model or layout the config
    lacks (a path, an existing module) or an axis value the axes lack gets its line in the
    index and no script; nothing outside the package is read into one."""
    crafted = [
        row(model="../../tests/jobs"),  # a .py file outside pipeline_lib/models
        row(model="mlp_uneven"),  # a built-in model the config does not name
        row(save="../ddp_2"),
        row(load="fsdp2_4"),
        row(mode="full; import os"),
        row(save_framework="existing"),
    ]
    matrix = tmp_path / "matrix.parquet"
    shouting = row(load="fsdp1_2", reason="\x1b[31m<script>x</script>\n| pass | fine |")
    pd.DataFrame([*crafted, row(reason=PWNED), shouting]).to_parquet(matrix)
    out = tmp_path / "reproducers"
    proc = _cli("--matrix", str(matrix), "--config-json", json.dumps(CONFIG), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    index = (out / "index.md").read_text()
    for why in [
        "model '../../tests/jobs' is not in the config",
        "model 'mlp_uneven' is not in the config",
        "layout '../ddp_2' is not in the config",
        "layout 'fsdp2_4' is not in the config",
        "mode 'full; import os' is not one of sharded, full",
        "an existing checkpoint",
    ]:
        assert f"not reproduced: {why}" in index
    scripts = sorted(out.glob("*/repro.py"))
    names = sorted(reproducer.cell_name(r) for r in (row(reason=PWNED), shouting))
    assert [p.parent.name for p in scripts] == names
    assert not any("def run_grid(" in p.read_text() for p in scripts)  # tests/jobs.py's
    # index.md: a reason is one line of its row, no HTML, no terminal escape
    assert "\x1b" not in index and "<script>" not in index
    assert len(index.splitlines()) == 4 + len(crafted) + 2
    # a matrix that cannot be read: one line, exit 1
    (tmp_path / "bad.parquet").write_text("not parquet")
    bad = _cli("--matrix", str(tmp_path / "bad.parquet"), "--config-json", json.dumps(CONFIG))
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_a_cell_that_cannot_be_written_does_not_stop_the_others(tmp_path, monkeypatch):
    """Two cells of a cross-release run that differ only in their torch versions each get
    their folder; a cell whose script fails gets error.txt in its, and the rest go on."""
    cells = [
        row(save="fsdp1_2", load="fsdp1_2", mode="full", status="crash"),
        row(save="fsdp1_2", load="fsdp1_2", mode="full", load_torch_version="2.14.1"),
        row(save="fsdp1_2", load="fsdp1_2", mode="full", save_torch_version="2.14.1",
            load_torch_version="2.14.1"),
        row(model="transformer"),
    ]  # fmt: skip
    real = reproducer.script_of

    def broken(cell):
        if cell.key["model"] == "transformer":
            raise RuntimeError("no room\nfor this one")
        return real(cell)

    monkeypatch.setattr(reproducer, "script_of", broken)
    written = reproducer.write_all(pd.DataFrame(cells), config(), str(tmp_path))
    assert sorted(p.name for p in written) == sorted(reproducer.cell_name(c) for c in cells[:3])
    failed = tmp_path / reproducer.cell_name(cells[3])
    assert (failed / "error.txt").read_text() == "RuntimeError: no room for this one\n"
    index = (tmp_path / "index.md").read_text()
    assert "error: RuntimeError: no room for this one" in index
    assert all(f"[{reproducer.cell_name(c)}]" in index for c in cells)
    readme = (written[1] / "README.txt").read_text()
    assert "saved under torch 2.13.0, loaded under torch 2.14.1" in readme


def test_the_report_never_waits_for_the_reproducers(tmp_path):
    """Snakemake's plan: the report is made without rule reproducers, which runs after it (so
    a failure there cannot cost the report)."""
    (tmp_path / "config.yaml").write_text(json.dumps({"models": ["mlp"], "layouts": {
        "single": {"framework": "single", "mesh": [1]}}}))  # fmt: skip

    def plan(*targets: str) -> list[str]:
        proc = procs.run(
            [str(Path(sys.executable).parent / "snakemake"), "-s", str(REPO / "Snakefile"),
             "-d", str(tmp_path), "--configfile", str(tmp_path / "config.yaml"), "-n",
             "--cores", "1", *targets], capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return [line.split()[1].rstrip(":") for line in proc.stdout.splitlines()
                if line.startswith(("rule ", "localrule "))]  # fmt: skip

    assert "reproducers" not in plan("results/report.html")
    every = plan()
    assert every.index("render_report") < every.index("reproducers")


def test_a_cell_of_another_checkpoint_library_gets_no_script():
    """engine torch_checkpointing: the library writes and reads the checkpoint, a script would
    import it (not torch only); its code is a stub in every other script."""
    with pytest.raises(reproducer.NotReproduced, match=r"^engine torch_checkpointing$"):
        reproducer.script(row(engine="torch_checkpointing"), config())
    text = reproducer.script(row(), config())
    assert "from torch_checkpointing" not in text and "import torch_checkpointing" not in text


def test_a_script_imports_torch_and_the_standard_library_only():
    """Every framework (saving and loading) and every model a config may name: the script
    compiles and imports nothing else (no pipeline_lib, pandas, psutil, xxhash, yaml)."""
    from pipeline_lib import frameworks, models

    layouts = {name: {"framework": name, "mesh": [1] * len(frameworks.get(name).mesh_dims)}
               for name in frameworks.names()}  # fmt: skip
    cfg = config_mod.validate({"models": models.names(), "layouts": layouts})
    every = frameworks.names()
    for i, save in enumerate(every):  # each framework saves once and loads once
        model, load = models.names()[i % len(models.names())], every[i - 1]
        text = reproducer.script(row(model, save, load), cfg)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module] if isinstance(node, ast.ImportFrom) else []
                names += [a.name for a in node.names if isinstance(node, ast.Import)]
                for name in names:
                    assert name.split(".")[0] in reproducer.ALLOWED_IMPORTS, (save, name)


# --- one copy: the script is the pipeline's code ----------------------------------------------
def _callables(obj) -> dict:
    """A seam's callables as the pipeline calls them: a function itself, a class's public
    methods (class and static methods included)."""
    if not isinstance(obj, type):
        return {"": obj}
    return {
        k: getattr(obj, k) for k in vars(obj) if not k.startswith("_") and callable(getattr(obj, k))
    }


def test_every_stand_in_takes_what_the_pipeline_passes_to_what_it_replaces():
    """A stand-in (a seam with ``by``) accepts the parameters of the definition it replaces, so
    a change to the pipeline's signature cannot leave the scripts calling it wrong (a
    ``TypeError`` at run time, as once for ``reuse.Store.of(spec, read=...)``)."""
    import importlib
    import inspect

    checked = 0
    for where, seam in reproducer.SEAMS.items():
        if seam.by is None:
            continue
        ref = inline.Ref.parse(where)
        ours = getattr(importlib.import_module(ref.module), ref.name)
        theirs = getattr(importlib.import_module(seam.by.module), seam.by.name)
        if not callable(ours):
            continue
        for name, fn in _callables(ours).items():
            if name and name not in _callables(theirs):
                continue
            stand_in = _callables(theirs)[name]
            want = [p.name for p in inspect.signature(fn).parameters.values()]
            got = [p.name for p in inspect.signature(stand_in).parameters.values()]
            assert got == want, (where, name, got, want)
            checked += 1
    assert checked >= 8


def test_a_change_to_the_pipeline_changes_the_script(tmp_path):
    """The script copies the package as it is now: a copy of pipeline_lib whose verdict and
    checkpoint code say otherwise gives a script that says otherwise, and every definition in
    a script is the package's own text (renamed references aside)."""
    package = tmp_path / "src" / "pipeline_lib"
    shutil.copytree(REPO / "pipeline_lib", package, ignore=shutil.ignore_patterns("__pycache__"))
    records = package / "verify" / "records.py"
    records.write_text(records.read_text().replace("entries differ; first", "ENTRIES DIFFER"))
    io = package / "job" / "checkpoint_io.py"
    io.write_text(io.read_text().replace("cpu_offload=full or rank0,", "cpu_offload=False,"))
    cell = reproducer.cell_data(row(), config())
    start = reproducer.roots(cell)
    ours = inline.bundle(start, reproducer.SEAMS)
    changed = inline.bundle(start, reproducer.SEAMS, root=tmp_path / "src")
    assert "ENTRIES DIFFER" in changed.text and "ENTRIES DIFFER" not in ours.text
    assert "cpu_offload=False," in changed.text and "cpu_offload=False," not in ours.text
    summarize = _load(changed, "pipeline_lib.verify.records:summarize")
    reason = summarize("files vs saver", {"a": EntryComparison(False, None, "x")})[1]
    assert reason == "files vs saver: 1 of 1 ENTRIES DIFFER a: x"
    original = _load(ours, "pipeline_lib.verify.records:summarize")
    assert (
        "entries differ; first a"
        in original("files vs saver", {"a": EntryComparison(False, None)})[1]
    )
    # every definition of a script is one of the package's (its docstring is there too)
    package_docstrings = {
        ast.get_docstring(n, clean=False)
        for p in (REPO / "pipeline_lib").rglob("*.py")
        for n in ast.walk(ast.parse(p.read_text()))
        if isinstance(n, (ast.FunctionDef, ast.ClassDef))
    }
    tree = ast.parse(ours.text)
    defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    docstrings = [ast.get_docstring(n, clean=False) for n in defs]
    assert sum(d is not None for d in docstrings) > 200
    assert all(d in package_docstrings for d in docstrings if d is not None)


def _load(bundle: inline.Bundle, ref: str):
    """A pure function of a bundle's text (one that uses nothing else), run from there."""
    name = bundle.name(ref)
    tree = ast.parse(bundle.text)
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace: dict = {}
    exec(ast.get_source_segment(bundle.text, node), namespace)
    return namespace[name]


def test_inline_copies_what_a_root_reaches_and_keeps_each_name_meaning_what_it_meant(tmp_path):
    """pipeline_lib.results.inline on a package of its own: a name two modules define, a variable that
    would hide a renamed definition, a local import of the package, an alias, a decorator, a
    base class and a constant needed at definition time, a seam and a stub."""
    package = tmp_path / "pipeline_lib"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text(
        "import math\n\nLIMIT = 3\n\n\ndef options():\n    return 'a'\n\n\n"
        "def twice(f):\n    return lambda: f() * 2\n\n\n"
        "class Base:\n    size = LIMIT + 1\n\n    def area(self):\n"
        "        return math.pi * self.size\n"
    )
    (package / "b.py").write_text(
        "from pipeline_lib import a\nfrom pipeline_lib.a import Base as Shape, twice\n\n\n"
        "def options():\n    return 'b'\n\n\n"
        "@twice\ndef both():\n    options = 'local'\n    return a.options() + options\n\n\n"
        "class Square(Shape):\n    def area(self):\n        from pipeline_lib.a import LIMIT\n"
        "        return [n for n in range(LIMIT) if (k := n)] + [k, options()]\n\n\n"
        "def leave_out():\n    return slow()\n\n\ndef slow():\n    return 'slow'\n\n\n"
        "def once(f):\n    return f\n\n\n"
        "def main():\n    return both(), Square().area(), Square.size, leave_out\n"
    )
    (package / "c.py").write_text("def build():\n    return 'c'\n")
    (package / "d.py").write_text(  # c.build has no twin, but a variable of its name here
        "from pipeline_lib import c\n\n\ndef make():\n    build = 'd'\n"
        "    return c.build() + build\n"
    )
    seams = {"pipeline_lib.b:slow": inline.Seam("too slow"),
             "pipeline_lib.a:twice": inline.Seam("", inline.Ref.parse("pipeline_lib.b:once"))}  # fmt: skip
    found = inline.bundle(["pipeline_lib.b:main", "pipeline_lib.d:make"], seams, root=tmp_path)
    assert found.imports == ["import math"]
    namespace: dict = {}
    exec(compile("\n".join(found.imports) + "\n" + found.text, "bundle", "exec"), namespace)
    both, area, size, leave_out = namespace[found.name("pipeline_lib.b:main")]()
    assert both == "alocal"  # a.options, not the local options; a.twice seamed by b.once
    assert (area, size) == ([1, 2, 2, "b"], 4)
    with pytest.raises(NotImplementedError, match=r"pipeline_lib\.b:slow is not in this file"):
        leave_out()
    assert "from pipeline_lib" not in found.text and "import pipeline_lib" not in found.text
    assert "def twice" not in found.text
    # a name two modules define, or a variable around one of its uses, is qualified
    assert [found.name(f"pipeline_lib.{m}:options") for m in "ab"] == ["a_options", "b_options"]
    assert found.name("pipeline_lib.c:build") == "c_build"
    assert namespace[found.name("pipeline_lib.d:make")]() == "cd"


# --- the script's launch ------------------------------------------------------------------------
@pytest.mark.torchrun
def test_the_scripts_launch_kills_a_hung_rank(tmp_path, monkeypatch):
    """The pipeline's launcher with the script's seams (pipeline_lib.results.reproducer.SEAMS): ranks
    that hang before their first progress mark are killed at the start-up timeout, with the
    processes they started: none is left running, reparented to init (each rank, and here
    each rank's child, has a session of its own: a process group would not reach them)."""
    program = tmp_path / "rank.py"
    program.write_text(  # a rank, and a process of its own (as an async save's checkpointer)
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(100)'],\n"
        "                         start_new_session=True)\n"
        "for pid, what in ((os.getpid(), 'rank'), (child.pid, 'child')):\n"
        "    open(f'{sys.argv[2]}.{what}{os.environ[\"RANK\"]}.pid', 'w').write(str(pid))\n"
        "time.sleep(100)\n"
    )
    mark = uuid.uuid4().hex
    monkeypatch.setenv(reproducer_run.LAUNCH_ENV, mark)
    monkeypatch.setattr(launcher, "worker_program", lambda: [str(program), "rank"])
    monkeypatch.setattr(launcher, "_agent", reproducer_run.exec_agent)
    monkeypatch.setattr(launcher, "kill_children", reproducer_run.kill_ranks)
    monkeypatch.setattr(launcher, "slurm_allocation", reproducer_run.no_allocation)
    started = time.monotonic()
    outcome = launcher.launch(2, [str(tmp_path / "spec")], tmp_path, 60, 12)
    assert outcome.status == "timeout", outcome
    assert time.monotonic() - started < 80  # the ranks sleep 100 s
    pids = [int(p.read_text()) for p in tmp_path.glob("spec.*.pid")]
    assert len(pids) == 4
    assert reproducer_run.kill_run(mark) == []  # nothing of the launch is left
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in _state(pid)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except OSError:
        return "Z"


# --- the reproducer and the pipeline give one verdict --------------------------------------------
@pytest.mark.torchrun
def test_a_reproducer_gives_the_pipelines_verdict(tmp_path, monkeypatch):
    """Five cells, one of each kind of finding, run by the pipeline (its save and load jobs,
    as Snakemake runs them), then each cell's reproducer in a fresh folder without
    pipeline_lib: the same status and reason signature (pipeline_lib.results.baseline.signature)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    rows = _pipeline_rows(config())
    for kind, (_, _, _, status, words) in CELLS.items():
        assert rows[kind]["status"] == status and words in rows[kind]["reason"], rows[kind]
    out = tmp_path / "reproducers"
    written = reproducer.write_all(pd.DataFrame(rows.values()), config(), str(out))
    assert len(written) == len(CELLS)
    with ThreadPoolExecutor(2) as pool:
        verdicts = dict(zip(rows, pool.map(_run_reproducer, written), strict=True))
    for kind, found in rows.items():
        expected = (found["status"], baseline.signature(found["reason"]))
        status, reason = verdicts[kind]
        assert (status, baseline.signature(reason)) == expected, (kind, reason)


def _pipeline_rows(cfg: dict) -> dict[str, dict]:
    """The cells of CELLS as the pipeline runs them: a save job per save layout, one load job
    (single) verifying every one."""
    by_layout: dict[str, list] = {}
    loads = []
    for variant, model, save, *_ in CELLS.values():
        root = grid.job_root(None, variant)
        by_layout.setdefault(save, []).append(grid.save_spec(cfg, model, save, root, variant))
        loads.append(grid.load_spec(cfg, model, "single", [(save, None)], root, variant))
    saves = [
        grid.job_spec(cfg, "save", layout, f"results/work/save/{layout}", items)
        for layout, items in by_layout.items()
    ]
    cli_all("save", saves)
    load = grid.job_spec(cfg, "load", "single", "results/work/load/single", loads)
    cli("load", load)
    return {
        kind: read_checked(item.record, LoadRecord).cells[0]
        for kind, item in zip(CELLS, load.items, strict=True)
    }


def _run_reproducer(folder: Path) -> tuple[str, str]:
    """``python repro.py`` in a fresh folder (no pipeline_lib on the path): its verdict. The
    run is marked, and whatever is left of it killed after (a timeout included)."""
    fresh = folder.parent.parent / "fresh" / folder.name
    fresh.mkdir(parents=True)
    shutil.copy(folder / "repro.py", fresh)
    mark = uuid.uuid4().hex
    try:
        proc = procs.run(
            [sys.executable, "repro.py"], cwd=fresh, capture_output=True, text=True,
            env={**_no_package(), reproducer_run.LAUNCH_ENV: mark}, timeout=500,
        )  # fmt: skip
    finally:
        reproducer_run.kill_run(mark)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("STATUS: ")), "")
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    status, _, reason = line.removeprefix("STATUS: ").partition(": ")
    return status, reason


def _no_package() -> dict:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return procs.run(
        [sys.executable, "-m", "pipeline_lib", "reproducers", *args],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
