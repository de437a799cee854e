"""A standalone reproducer per cell that does not pass: ``<out>/<cell name>/repro.py`` and
``README.txt``, and ``<out>/index.md`` listing them (and why a cell has none).

The script is the pipeline's own code for the cell and the cell as data. The code: what
pipeline_lib.results.reproducer_run.main reaches (the pipeline's driver, launcher, worker,
training, checkpoint I/O and checks, the cell's model and frameworks), copied from the package
by pipeline_lib.results.inline, with the few seams of ``SEAMS``; it imports torch and the
standard library only. The data (results.reproducer_cell.Cell): the cell's save job and load job
as pipeline_lib.plan.grid makes them from the config (never from the matrix: a row naming a
model or layout the config lacks gets an error line and no script), and the run's status and
reason. Values go into the script as Python literals
(``repr``), never as code. ``python repro.py`` runs both jobs as the pipeline does and prints
``STATUS: <status>: <reason>``, the verdict of pipeline_lib.verify.records.

A cell is not reproduced when the script could not be torch-only or has nothing to run: an
``hf_models`` model (transformers builds it), an existing checkpoint (its folder and the load
job's log are the reproducer). A script checks what the exact mode checks (``verify.reference:
sealed`` reads the seal with xxhash).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import html
import json
import math
import pprint
import re
import sys
import traceback
from functools import cache
from pathlib import Path

from pipeline_lib import models
from pipeline_lib.plan import grid
from pipeline_lib.plan.axes import AXES, DEFAULT, Variant
from pipeline_lib.results import inline
from pipeline_lib.results.inline import Ref, Seam
from pipeline_lib.results.reproducer_cell import Cell
from pipeline_lib.verify.records import AXIS_COLUMNS, CELL_KEYS

REPRODUCED = ("fail", "error", "crash", "timeout")
RUN = "pipeline_lib.results.reproducer_run"
# The top-level modules a script may import: torch and the standard library.
ALLOWED_IMPORTS = frozenset(sys.stdlib_module_names) | {"torch"}


def _by(name: str, why: str) -> Seam:
    return Seam(why, Ref(RUN, name))


# What stands in for a pipeline definition in a script (pipeline_lib.results.reproducer_run says why
# each differs), and the code a script leaves out (a stub that raises: its cells are not
# reproduced, or it runs only for a fault or a mode a script does not use).
SEAMS = {
    "pipeline_lib.frameworks:get": _by("framework", "the cell's frameworks, by name"),
    "pipeline_lib.frameworks:names": _by("framework_names", "the cell's frameworks"),
    "pipeline_lib.models:get": _by("model", "the cell's model"),
    "pipeline_lib.job.launcher:worker_program": _by("rank_program", "a rank runs the script"),
    "pipeline_lib.job.launcher:_agent": _by("exec_agent", "every rank a fresh process"),
    "pipeline_lib.job.launcher:kill_children": _by("kill_ranks", "every process of the run"),
    "pipeline_lib.job.launcher:slurm_allocation": _by("no_allocation", "this machine only"),
    "pipeline_lib.job.launcher:_SrunLauncher": Seam("a reproducer runs on one machine"),
    "pipeline_lib.job.reuse:Store": _by("NoReuse", "a reproducer runs every unit"),
    "pipeline_lib.plan.disk_estimate:room_error": _by("room_error", "no disk estimate"),
    "pipeline_lib.verify.faults:FAULTS": _by("NO_FAULTS", "a reproducer injects no fault"),
    "pipeline_lib.job.hf_export:run": Seam("format hf_export needs an hf_models model"),
    "pipeline_lib.job.engines:write": Seam("engine torch_checkpointing: not torch only"),
    "pipeline_lib.job.engines:read": Seam("engine torch_checkpointing: not torch only"),
    "pipeline_lib.job.hf_export:refuse_unless_hf": Seam("format hf_export: hf_models only"),
    "pipeline_lib.job.existing:placement": Seam("an existing checkpoint is not reproduced"),
    "pipeline_lib.job.existing:load": Seam("an existing checkpoint is not reproduced"),
    "pipeline_lib.job.existing:hf_placement": Seam("an existing checkpoint is not reproduced"),
    "pipeline_lib.job.existing:load_hf_folder": Seam("an existing checkpoint is not reproduced"),
    "pipeline_lib.job.existing:fresh_optimizer": Seam("an existing checkpoint is not reproduced"),
    "pipeline_lib.job.worker:check_and_seal": Seam("a reproducer checks in exact mode"),
    "pipeline_lib.verify.sealed_mode:files_reference": Seam("a reproducer checks in exact mode"),
    "pipeline_lib.verify.sealed_mode:check_seal": Seam("a reproducer checks in exact mode"),
    "pipeline_lib.verify.sealed_mode:sharing_only": Seam("a reproducer checks in exact mode"),
}


class NotReproduced(ValueError):
    """A cell that gets no script: the message says why, in one line."""


# --- the cell's name ---------------------------------------------------------------------------
_POSITIONAL = ("model", "save_layout", "load_layout")
_VERSIONS = ("save_torch_version", "load_torch_version")
# Values that keep a name readable and unambiguous ('.' separates its parts, '-' a column's
# name from its value); anything else, and a name cut to length, adds a digest of the key.
_PLAIN = re.compile(r"[A-Za-z0-9_+]+(?:-[A-Za-z0-9_+]+)*")
_VERSION = re.compile(r"[A-Za-z0-9_+]+(?:\.[0-9][A-Za-z0-9_+]*)*")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.+=-]")
_NAME_BYTES = 200  # a folder name: at most 255 bytes


def cell_name(row: dict) -> str:
    """A folder name unique over the whole cell key (records.CELL_KEYS), derived from it:
    ``<variant>.<model>.<save layout>.<load layout>.torch-<version>[-<load version>]``, where
    the variant is the axis columns that differ from their defaults (``mode-full+format-
    torch_save``, or ``default``), then ``<column>-<value>`` for any other key column with a
    value.
    Path-safe; a value outside the plain characters (or a name cut to length) adds a digest of
    the whole key, so two keys never share a name."""
    value = {k: _text(row.get(k)) for k in CELL_KEYS}
    axes = [k for k in CELL_KEYS if k in AXIS_COLUMNS]
    changed = [f"{a}-{value[a]}" for a in axes if value[a] and value[a] != getattr(DEFAULT, a)]
    parts = ["+".join(changed) or "default", *(value[k] for k in _POSITIONAL)]
    saver, loader = (value[k] for k in _VERSIONS)
    if saver or loader:
        parts.append(f"torch-{saver}" if saver == loader else f"torch-{saver}-{loader}")
    rest = [k for k in CELL_KEYS if k not in (*_POSITIONAL, *_VERSIONS, *axes) and value[k]]
    parts += [f"{k}-{value[k]}" for k in rest]
    plain = all(_PLAIN.fullmatch(value[k]) for k in _POSITIONAL) and all(
        (_VERSION if k in _VERSIONS else _PLAIN).fullmatch(value[k])
        for k in (*_VERSIONS, *axes, *rest)
        if value[k]
    )
    name = _UNSAFE.sub("_", ".".join(parts))
    if not plain or len(name.encode()) > _NAME_BYTES:
        digest = hashlib.sha256(json.dumps([value[k] for k in CELL_KEYS]).encode()).hexdigest()
        name = f"{name[: _NAME_BYTES - 13]}-{digest[:12]}"
    return name


def cell_id(row: dict) -> str:
    """The cell's reproducer folder name (``cell_name``)."""
    return cell_name(row)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _text(value) -> str:
    return "" if _missing(value) else str(value)


# --- the cell as data --------------------------------------------------------------------------
def row_variant(row: dict) -> Variant:
    """The variant of a matrix row (an axis a row predates holds its default); a value that is
    not one of the axis's raises NotReproduced."""
    values = {}
    for axis in AXIS_COLUMNS:
        value = row.get(axis)
        value = getattr(DEFAULT, axis) if _missing(value) else value
        if value not in AXES[axis]:
            allowed = ", ".join(AXES[axis])
            raise NotReproduced(f"{axis} {_text(value)[:60]!r} is not one of {allowed}")
        values[axis] = value
    return Variant(**values)


def cell_data(row: dict, config: dict) -> Cell:
    """What a script holds of its cell: the save job and the load job as pipeline_lib.plan.grid
    makes them from the config (exact mode, paths under ``results/`` of the script's folder),
    and the cell's key, status and reason in the run."""
    model, save, load = (_text(row.get(k)) for k in ("model", "save_layout", "load_layout"))
    if _text(row.get("save_framework")) == "existing":
        raise NotReproduced("an existing checkpoint (its folder and the load job's log are one)")
    if model not in config["models"]:
        raise NotReproduced(f"model {model[:60]!r} is not in the config")
    for layout in (save, load):
        if layout not in config["layouts"]:
            raise NotReproduced(f"layout {layout[:60]!r} is not in the config")
    if model in config.get("hf_models", {}):
        raise NotReproduced("an hf_models model")  # transformers builds it: not torch only
    if model in config.get("torchtitan_models", {}):
        raise NotReproduced("a torchtitan_models model")  # torchtitan builds it
    variant = row_variant(row)
    if variant.engine != "dcp":  # its library writes and reads the checkpoint: not torch only
        raise NotReproduced(f"engine {variant.engine}")
    config = copy.deepcopy(config)
    config["verify"]["reference"] = "exact"
    root = grid.job_root(None, variant)
    save_item = grid.save_spec(config, model, save, root, variant)
    load_item = grid.load_spec(config, model, load, [(save, None)], root, variant)
    key = {k: None if _missing(row.get(k)) else row.get(k) for k in CELL_KEYS}
    cell = Cell(
        key={**key, **variant.to_dict()},
        status=_text(row.get("status")),
        reason=_text(row.get("reason")),
        save_job=grid.job_spec(config, "save", save, f"{root}/work/save/{save}", [save_item]),
        load_job=grid.job_spec(config, "load", load, f"{root}/work/load/{load}", [load_item]),
    )
    data = cell.to_dict()
    if json.loads(json.dumps(data, allow_nan=False)) != data:
        raise NotReproduced("the cell's data is not plain JSON")
    return cell


# --- the script --------------------------------------------------------------------------------
def _frameworks(cell: Cell) -> list[str]:
    return sorted({job.layout.framework for job in (cell.save_job, cell.load_job)})


def roots(cell: Cell) -> list[str]:
    """What a script starts from: reproducer_run.main, the cell's frameworks, its model."""
    frameworks = _frameworks(cell)
    model = cell.key["model"]
    found = [f"{RUN}:main", *(f"pipeline_lib.frameworks.{f}:FRAMEWORK" for f in frameworks)]
    if models.is_import_path(model):
        return [*found, "pipeline_lib.models._user:load"]
    return [*found, f"{RUN}:model_module", f"pipeline_lib.models.{model}:build"]


@cache
def _bundle(start: tuple[str, ...]) -> inline.Bundle:
    found = inline.bundle(list(start), SEAMS)
    for line in found.imports:
        module = line.split()[1].split(".")[0]
        if module not in ALLOWED_IMPORTS:
            chain = " -> ".join(map(str, found.chain(found.imported_for[line])))
            raise NotReproduced(f"the script would import {module} (not torch only) for {chain}")
    return found


def script(row: dict, config: dict) -> str:
    """The reproducer of a matrix row's cell (NotReproduced: why it has none)."""
    return script_of(cell_data(row, config))


def script_of(cell: Cell) -> str:
    """The reproducer of a cell (``cell_data``)."""
    code = _bundle(tuple(roots(cell)))
    table = (
        f"{f!r}: {code.name(f'pipeline_lib.frameworks.{f}:FRAMEWORK')}" for f in _frameworks(cell)
    )
    fill = [f"{code.name(f'{RUN}:FRAMEWORKS')}.update({{{', '.join(table)}}})"]
    model = cell.key["model"]
    if models.is_import_path(model):
        made = f"{code.name('pipeline_lib.models._user:load')}({model!r})"
    else:
        build = code.name(f"pipeline_lib.models.{model}:build")
        made = f"{code.name(f'{RUN}:model_module')}({build})"
    fill.append(f"{code.name(f'{RUN}:MODELS')}[{model!r}] = {made}")
    return "\n".join(
        [
            HEAD,
            _describe(cell),
            "from __future__ import annotations\n",
            *code.imports,
            "\nCELL = " + pprint.pformat(cell.to_dict(), sort_dicts=False, width=99),
            "\n",
            code.text,
            "# --- the cell's frameworks and model, by name (pipeline_lib/results/reproducer.py)",
            *fill,
            "\n",
            'if __name__ == "__main__":',
            f"    {code.name(f'{RUN}:main')}(CELL, sys.argv[1:])",
            "",
        ]
    )


HEAD = '''#!/usr/bin/env python3
"""Reproducer of a dcp-matrix cell: torch and the standard library only (see README.txt).

    python repro.py          # the save job, the load job, then STATUS: <status>: <reason>
    python repro.py save     # only the save job; then `python repro.py load` (another torch?)

It runs the pipeline's own code, copied from pipeline_lib (each block names its module): the
pipeline's driver runs each job, torchrun's agent in this process starting every rank as
`python repro.py rank SPEC`; the ranks train, save, load and check as the pipeline's worker
does, and the verdict is the pipeline's (records). CELL below is the cell: its two jobs as the
pipeline's grid made them, and its status in the run. Everything goes to results/ beside the
script.
"""'''


def _describe(cell: Cell) -> str:
    """Comment lines naming the cell (values as ``ascii`` reprs: one line each, no code)."""
    lines = [f"# {k}: {v!a}" for k, v in cell.key.items() if v is not None]
    lines.append(f"# status in the run: {cell.status!a}")
    lines.append(f"# reason: {cell.reason[:300]!a}")
    return "\n".join(lines) + "\n"


def readme(cell: Cell) -> str:
    """README.txt of a cell's reproducer."""
    key = cell.key
    saver, loader = key.get("save_torch_version"), key.get("load_torch_version")
    if saver and loader and saver != loader:
        versions = (
            f"saved under torch {saver}, loaded under torch {loader}: run `python repro.py "
            f"save` in an environment with torch {saver}, then `python repro.py load` in one "
            f"with torch {loader}, in the same folder"
        )
    else:
        versions = f"torch {saver or 'as the run'}"
    described = ", ".join(f"{k} {v}" for k, v in key.items() if v is not None)
    reason = " ".join(cell.reason.split())
    return (
        f"Reproducer of a dcp-matrix cell ({described}).\n"
        f"Status in the run: {cell.status}: {reason}\n\n"
        f"Needs torch only ({versions}). In a fresh folder:\n\n"
        "  python repro.py\n\n"
        "runs the cell's save job and load job (torchrun, one process per rank) with the\n"
        "pipeline's own code, copied into the script, and prints STATUS: <status>: <reason>.\n"
        "Everything it writes is under results/ beside the script. The torch calls are in\n"
        "the blocks of pipeline_lib/job/checkpoint_io.py (save, load),\n"
        "pipeline_lib/job/training.py (build, train, get_state_dict) and\n"
        "pipeline_lib/frameworks/ (parallelize).\n"
        + (
            f"The model is your own ({key['model']}): its module must be importable (PYTHONPATH).\n"
            if models.is_import_path(key["model"])
            else ""
        )
    )


# --- every reproducer of a matrix --------------------------------------------------------------
def write_all(matrix, config: dict, out: str) -> list[Path]:
    """A reproducer folder per cell whose status is not pass/skip (``out`` is made afresh);
    ``index.md`` lists each, or why a cell has none. A cell whose script cannot be written
    gets ``error.txt`` in its folder (one line; the traceback goes to stderr) and the others
    go on."""
    import shutil

    root = Path(out)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    written = []
    index = ["# Reproducers", "", "| cell | status | reproducer |", "|---|---|---|"]
    for row in matrix[matrix.status.isin(REPRODUCED)].to_dict("records"):
        line, folder = _write_one(root, row, config)
        index.append(line)
        written += [folder] if folder else []
    (root / "index.md").write_text("\n".join(index) + "\n")
    return written


def _write_one(root: Path, row: dict, config: dict) -> tuple[str, Path | None]:
    """One cell's line of index.md, and its folder if it got a script."""
    name = cell_name(row)
    folder, status = root / name, _md(_text(row.get("status")))
    try:
        cell = cell_data(row, config)
        files = {"repro.py": script_of(cell), "README.txt": readme(cell)}
        folder.mkdir()
        for file, text in files.items():
            (folder / file).write_text(text)
    except NotReproduced as exc:
        return f"| {_md(name)} | {status} | not reproduced: {_md(str(exc))} |", None
    except Exception as exc:  # this cell's failure: written down, the others go on
        why = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        print(f"reproducer of {name}: {why}", file=sys.stderr)
        traceback.print_exc()
        with contextlib.suppress(OSError):
            folder.mkdir(exist_ok=True)
            (folder / "error.txt").write_text(why + "\n")
        return f"| [{name}]({name}/error.txt) | {status} | error: {_md(why)} |", None
    reason = _md(_text(row.get("reason")))[:200]
    return f"| [{name}]({name}/repro.py) | {status} | {reason} |", folder


def _md(text: str) -> str:
    """One line of a Markdown table cell: no HTML, no control character (ANSI escapes)."""
    text = " ".join(text.split())
    text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    return html.escape(text, quote=False).replace("|", "\\|")
