"""One command per job: ``python -m pipeline_lib {save,load,aggregate,check-config} ...``.

save/load take the job's spec (JSON, built by pipeline_lib.grid) and always write their record
and exit 0 when the job itself failed: a failing cell never stops the matrix.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path

from pipeline_lib import grid
from pipeline_lib.atomic import read_json, write_json
from pipeline_lib.errors import one_line
from pipeline_lib.launcher import launch


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _run_worker(spec: dict, work: Path, attempt: int) -> tuple[str, str, str]:
    """Launch the worker ranks for ``spec``: (status, reason, last progress step)."""
    if spec["skip"]:  # the variant cannot run on this layout: no launch
        return "skip", spec["skip"], ""
    spec = {**spec, "launched_at": time.time()}
    spec_path = work / f"spec-{attempt}.json"
    write_json(spec_path, spec)
    run = spec["run"]
    outcome = launch(
        spec["layout"]["world_size"],
        [str(spec_path)],
        work,
        run["cell_timeout_s"],
        run["startup_timeout_s"],
    )
    job_file = work / "results" / "job.json"
    job_result = read_json(job_file) if job_file.exists() else None
    job_file.unlink(missing_ok=True)
    if job_result and job_result["status"] == "skip":
        return "skip", job_result["reason"], outcome.step
    if job_result and outcome.status == "error":
        # Rank 0's own account of its exception is more precise than the exit code.
        return (
            "error",
            f"{job_result['reason']} (during {outcome.step or 'start-up'})",
            outcome.step,
        )
    return outcome.status, outcome.reason, outcome.step


def checkpoint_size(path: Path) -> tuple[int, int]:
    """(bytes, files) of a checkpoint folder or file."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def files_check(spec: dict) -> tuple[dict, str]:
    """Files vs saver: read what the load jobs will read back in this process, independently of
    the saving ranks, and compare every entry bit for bit with the saver's in-memory state."""
    import torch

    from pipeline_lib.axes import Variant
    from pipeline_lib.state import checkpoint_entries, compare, file_entries

    variant = Variant(**spec["variant"])
    reference = torch.load(spec["reference"], mmap=True, weights_only=True)
    entries: dict[str, dict] = {}
    path = spec["full_state"] if variant.reads_full_state else spec["checkpoint"]
    try:
        if variant.reads_full_state:
            read = file_entries(path)
        else:
            read = checkpoint_entries(path, variant.format.startswith("safetensors"))
        for name, value in read:
            if isinstance(value, BaseException):
                entries[name] = {
                    "equal": False,
                    "max_abs_diff": None,
                    "note": f"unreadable: {one_line(value)}",
                }
            elif name not in reference:
                entries[name] = {
                    "equal": False,
                    "max_abs_diff": None,
                    "note": "not in the saver's state",
                }
            else:
                entries[name] = vars(compare(reference[name], value))
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        return {}, f"files vs saver: cannot read checkpoint {path}: {one_line(exc)}"
    for name in reference:
        entries.setdefault(
            name, {"equal": False, "max_abs_diff": None, "note": "missing in the checkpoint"}
        )
    return entries, ""


def convert(spec: dict) -> None:
    """The conversions of formats torch_save (DCP -> torch.save file) and torch_save_to_dcp
    (torch.save file -> DCP), in this one process as a user runs them offline."""
    fmt = spec["variant"]["format"]
    if fmt not in ("torch_save", "torch_save_to_dcp"):
        return
    # Imported only here: it costs a save job about a second.
    from torch.distributed.checkpoint import format_utils

    if fmt == "torch_save":
        format_utils.dcp_to_torch_save(spec["checkpoint"], spec["full_state"])
    elif fmt == "torch_save_to_dcp":
        format_utils.torch_save_to_dcp(spec["full_state"], spec["checkpoint"])


def torch_version() -> str:
    """The torch this job runs (its environment's; known even when every rank crashed)."""
    return metadata.version("torch")


def cmd_save(spec: dict) -> None:
    from pipeline_lib.axes import Variant
    from pipeline_lib.faults import FAULTS

    variant = Variant(**spec["variant"])
    work = _fresh_dir(Path(spec["work_dir"]))
    checkpoint = Path(spec["checkpoint"])
    _fresh_dir(Path(spec["save_dir"]))
    status, reason, _ = _run_worker(spec, work, 1)
    record = {
        "model": spec["model"],
        "layout": spec["layout"],
        "checkpoint": spec["checkpoint"],
        "reference": spec["reference"],
        "config_hash": spec["config_hash"],
        "created_at": _now(),
        "status": status,
        "reason": reason,
        "torch_version": torch_version(),
    }
    result_file = work / "results" / "save.json"
    if status == "ok" and not result_file.exists():
        record.update(status="error", reason="save worker ended without a result")
    elif status == "ok":
        record.update(read_json(result_file))
        t = time.perf_counter()
        try:
            convert(spec)
        except Exception as exc:
            record.update(status="error", reason=f"conversion: {one_line(exc)}")
        record["timing"]["convert_s"] = time.perf_counter() - t
    if record["status"] == "ok":
        fault = FAULTS.get(spec.get("fault"))
        if fault and fault.stage == "checkpoint":
            record["fault_applied"] = fault.apply(checkpoint)
        t = time.perf_counter()
        record["files_check"], record["files_error"] = files_check(spec)
        record["timing"]["files_check_s"] = time.perf_counter() - t
        read = spec["full_state"] if variant.reads_full_state else spec["checkpoint"]
        record["checkpoint_bytes"], record["checkpoint_files"] = checkpoint_size(Path(read))
    write_json(spec["record"], record)


def cmd_load(spec: dict) -> None:
    from pipeline_lib.records import cell_row, tensor_rows

    work = _fresh_dir(Path(spec["work_dir"]))
    saves = {s["id"]: read_json(s["save_record"]) for s in spec["sources"]}
    results: dict[str, dict] = {
        name: {"status": "not_run", "reason": "the save job failed"}
        for name, save in saves.items()
        if save["status"] != "ok"
    }
    pending = [
        {**s, "reference": saves[s["id"]]["reference"]}
        for s in spec["sources"]
        if s["id"] not in results
    ]
    attempt = 0
    # One launch verifies every checkpoint; after a crash or hang, the cell in progress is
    # recorded as such and the cells not reached run again in a fresh launch.
    while pending:
        attempt += 1
        status, reason, step = _run_worker({**spec, "sources": pending}, work, attempt)
        for s in pending:
            cell_file = work / "results" / f"{s['id']}.json"
            if cell_file.exists():
                results[s["id"]] = read_json(cell_file)
        left = [s["id"] for s in pending if s["id"] not in results]
        if not left:
            break
        current = step.removeprefix("cell ") if step.startswith("cell ") else None
        if status == "ok":
            status, reason = "error", "load worker ended without a result for this cell"
        if current in left and status != "skip":
            results[current] = {"status": status, "reason": reason}
        else:  # failed before its first cell: every cell not reached shares the failure
            results.update({name: {"status": status, "reason": reason} for name in left})
        pending = [s for s in pending if s["id"] not in results]

    cells, tensors = [], []
    for source in spec["sources"]:
        name = source["id"]
        load = {**results[name], "layout": spec["layout"], "torch_version": torch_version()}
        save = saves[name]
        cells.append(cell_row(spec["model"], save, load, spec))
        tensors.extend(tensor_rows(spec["model"], save, load, spec["variant"]))
    record = {"cells": cells, "tensors": tensors, "launches": attempt}
    if spec.get("fault"):
        record["fault"] = spec["fault"]
    write_json(spec["record"], record)


def cmd_aggregate(args: argparse.Namespace) -> None:
    from pipeline_lib.aggregate import aggregate

    aggregate(args.records, args.matrix, args.tensors, git_commit=args.git_commit)


def cmd_selftest(args: argparse.Namespace) -> None:
    from pipeline_lib.selftest import check, summarize

    if args.check:
        sys.exit(check(args.check, args.ok))
    summarize(args.records, args.table, args.markdown)


def cmd_make_env(args: argparse.Namespace) -> None:
    from pipeline_lib.environments import make_env

    make_env(Path(args.prefix), args.requirement)


def cmd_check_config(args: argparse.Namespace) -> None:
    from pipeline_lib import config

    cfg = config.load(args.configfile)
    saves, loads = len(grid.save_layouts(cfg)), len(grid.load_layouts(cfg))
    print(
        f"{args.configfile}: valid; {len(grid.cells(cfg))} cells, {len(cfg['models'])} model(s) "
        f"x {saves} save layout(s) x {loads} load layout(s)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline_lib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("save", "load"):
        p = sub.add_parser(name, help=f"run one {name} job")
        p.add_argument("--spec", required=True, help="the job spec as JSON (pipeline_lib.grid)")
    p = sub.add_parser("aggregate", help="job records -> matrix.parquet and tensors.parquet")
    p.add_argument("--matrix", required=True)
    p.add_argument("--tensors", required=True)
    p.add_argument("--git-commit", default="unknown")
    p.add_argument("records", nargs="+")
    p = sub.add_parser("selftest", help="fault-campaign records -> selftest.parquet / .md")
    p.add_argument("--table", help="selftest.parquet to write")
    p.add_argument("--markdown", help="selftest.md to write")
    p.add_argument("--check", help="selftest.parquet to check: exit 1 if a fault was missed")
    p.add_argument("--ok", help="with --check: marker file written when every fault was caught")
    p.add_argument("records", nargs="*")
    p = sub.add_parser("make-env", help="build a torch_versions environment (venv + project)")
    p.add_argument("--requirement", required=True, help='pip requirement, e.g. "torch==2.14.1"')
    p.add_argument("--prefix", required=True, help="the environment's folder")
    p = sub.add_parser("check-config", help="validate a config file and count its cells")
    p.add_argument("configfile")
    args = parser.parse_args(argv)
    if args.command in ("save", "load"):
        spec = json.loads(args.spec)
        (cmd_save if args.command == "save" else cmd_load)(spec)
    elif args.command == "aggregate":
        cmd_aggregate(args)
    elif args.command == "selftest":
        cmd_selftest(args)
    elif args.command == "make-env":
        cmd_make_env(args)
    else:
        cmd_check_config(args)
