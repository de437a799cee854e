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

from pipeline_lib import grid, timestamps
from pipeline_lib.atomic import read_json, write_json
from pipeline_lib.launcher import Outcome, launch
from pipeline_lib.names import inside


def _fresh_dir(path: Path) -> Path:
    """An empty folder at ``path``, which must lie inside the working directory (names.inside:
    a name like '..' never gets here, this is the last line of defence before rmtree)."""
    inside(path)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _run_worker(spec: dict, work: Path, attempt: int) -> Outcome:
    """Launch the worker ranks for ``spec`` (a job): the launcher's outcome, with rank 0's
    own account of a job-level exception, which is more precise than the exit code."""
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
    if job_file.exists() and outcome.status == "error":
        reason = read_json(job_file)["reason"]
        outcome.reason = f"{reason} (during {outcome.step or 'start-up'})"
    job_file.unlink(missing_ok=True)
    return outcome


def _narrowed(spec: dict, pending: set[str]) -> dict:
    """The job with only the units in ``pending``: items of a save job, cells (item.source)
    of a load job."""
    items = []
    for item in spec["items"]:
        if spec["kind"] == "save":
            if item["id"] in pending:
                items.append(item)
            continue
        sources = [s for s in item["sources"] if grid.unit_id(item["id"], s["id"]) in pending]
        if sources:
            items.append({**item, "sources": sources})
    return {**spec, "items": items}


def run_units(spec: dict, work: Path, pending: list[str]) -> tuple[dict[str, dict], int]:
    """A result for every pending unit of the job, and the number of launches it took. One
    launch runs them all; after a crash or hang, the unit in progress is recorded as such and
    the units not reached run again in a fresh launch."""
    results: dict[str, dict] = {}
    attempt = 0
    while pending:
        attempt += 1
        outcome = _run_worker(_narrowed(spec, set(pending)), work, attempt)
        for unit in pending:
            path = work / "results" / f"{unit}.json"
            if path.exists():
                results[unit] = read_json(path)
        left = [unit for unit in pending if unit not in results]
        if not left:
            break
        status, reason = outcome.status, outcome.reason
        if status == "ok":
            status, reason = "error", "worker ended without a result for this cell"
        if outcome.unit in left:
            results[outcome.unit] = {"status": status, "reason": reason}
        else:  # failed before its first unit: every unit not reached shares the failure
            results.update({unit: {"status": status, "reason": reason} for unit in left})
        pending = [unit for unit in left if unit not in results]
    return results, attempt


def checkpoint_size(path: Path) -> tuple[int, int]:
    """(bytes, files) of a checkpoint folder or file."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def torch_version() -> str:
    """The torch this job runs (its environment's; known even when every rank crashed)."""
    return metadata.version("torch")


def cmd_save(spec: dict) -> None:
    """Every item of a save job: one launch (more after a crash), then a record per item."""
    from pipeline_lib.disk import room_error

    work = _fresh_dir(Path(spec["work_dir"]))
    for item in spec["items"]:
        _fresh_dir(Path(item["save_dir"]))
    skipped = {i["id"]: {"status": "skip", "reason": i["skip"]} for i in spec["items"] if i["skip"]}
    pending = [i["id"] for i in spec["items"] if not i["skip"]]
    if no_room := room_error(spec, work):
        results = {unit: {"status": "error", "reason": no_room} for unit in pending}
    else:
        results, _ = run_units(spec, work, pending)
    for item in spec["items"]:
        result = skipped.get(item["id"]) or results[item["id"]]
        write_json(item["record"], save_record(item, result))


def save_record(item: dict, result: dict) -> dict:
    """The record of one save item from the worker's result (or the job's failure)."""
    from pipeline_lib.axes import Variant

    variant = Variant(**item["variant"])
    record = {
        "model": item["model"],
        "layout": item["layout"],
        "checkpoint": item["checkpoint"],
        "reference": item["reference"],
        "config_hash": item["config_hash"],
        "created_at": timestamps.now(),
        "torch_version": torch_version(),
        **result,
    }
    if record["status"] != "ok":
        return record
    read = item["full_state"] if variant.reads_full_state else item["checkpoint"]
    record["checkpoint_bytes"], record["checkpoint_files"] = checkpoint_size(Path(read))
    return record


def cmd_load(spec: dict) -> None:
    """Every cell of a load job (item x source): one launch (more after a crash or hang),
    then one record per item."""
    from pipeline_lib.disk import room_error
    from pipeline_lib.records import cell_row, tensor_rows

    work = _fresh_dir(Path(spec["work_dir"]))
    saves, results, items = {}, {}, []
    for item in spec["items"]:
        sources = []
        for source in item["sources"]:
            unit = grid.unit_id(item["id"], source["id"])
            save = saves[unit] = read_json(source["save_record"])
            # The folders the spec names (grid.load_spec), whatever a record on disk says.
            expected = {k: source[k] for k in ("checkpoint", "reference") if k in source}
            moved = [k for k, path in expected.items() if save.get(k, path) != path]
            if save["status"] != "ok":
                results[unit] = {"status": "not_run", "reason": "the save job failed"}
            elif moved:
                results[unit] = {
                    "status": "error",
                    "reason": f"the save record {source['save_record']} names another "
                    f"{moved[0]} ({save[moved[0]]!r}, expected {expected[moved[0]]!r})",
                }
            elif item["skip"]:
                results[unit] = {"status": "skip", "reason": item["skip"]}
            else:
                sources.append({"reference": save["reference"], **source})
        items.append({**item, "sources": sources})
    pending = [grid.unit_id(i["id"], s["id"]) for i in items for s in i["sources"]]
    if no_room := room_error({**spec, "items": items}, work):
        launched, launches = {unit: {"status": "error", "reason": no_room} for unit in pending}, 0
    else:
        launched, launches = run_units({**spec, "items": items}, work, pending)
    results.update(launched)

    for item in spec["items"]:
        cells, tensors = [], []
        for source in item["sources"]:
            unit = grid.unit_id(item["id"], source["id"])
            load = {**results[unit], "layout": item["layout"], "torch_version": torch_version()}
            cells.append(cell_row(item["model"], saves[unit], load, item))
            tensors.extend(tensor_rows(item["model"], saves[unit], load, item["variant"]))
        record = {"cells": cells, "tensors": tensors, "launches": launches}
        if item.get("fault"):
            record["fault"] = item["fault"]
        write_json(item["record"], record)


def cmd_aggregate(args: argparse.Namespace) -> None:
    from pipeline_lib.aggregate import aggregate

    aggregate(args.records, args.matrix, args.tensors, git_commit=args.git_commit)


def cmd_selftest(args: argparse.Namespace) -> None:
    from pipeline_lib.selftest import check, summarize

    if args.check:
        sys.exit(check(args.check, args.ok))
    summarize(args.records, args.table, args.markdown)


def cmd_make_env(args: argparse.Namespace) -> None:
    from pipeline_lib.config import env_dir_error
    from pipeline_lib.environments import make_env

    if error := env_dir_error(args.prefix):
        sys.exit(f"make-env: --prefix: {error}")
    make_env(Path(args.prefix), args.requirement)


def cmd_check_config(args: argparse.Namespace) -> None:
    """Valid: one line of counts and one of the disk estimate. Invalid: one line per error on
    stderr (no traceback), exit status 1."""
    from pipeline_lib import config
    from pipeline_lib.disk import grid_bytes

    try:
        cfg = config.load(args.configfile)
    except config.ConfigError as exc:
        for line in config.error_lines(exc):
            print(line, file=sys.stderr)
        sys.exit(1)
    saves, loads = len(grid.save_layouts(cfg)), len(grid.load_layouts(cfg))
    print(
        f"{args.configfile}: valid; {len(grid.cells(cfg))} cells, {len(cfg['models'])} model(s) "
        f"x {saves} save layout(s) x {loads} load layout(s)"
    )
    print(f"{args.configfile}: the grid writes {grid_bytes(cfg)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline_lib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("save", "load"):
        p = sub.add_parser(name, help=f"run one {name} job")
        given = p.add_mutually_exclusive_group(required=True)
        given.add_argument("--spec", help="the job spec as JSON (pipeline_lib.grid.job_spec)")
        # A grid's job spec can exceed the 128 KiB a command-line argument may hold.
        given.add_argument(
            "--grid", help="the validated config as JSON: the job of --root, --layout"
        )
        p.add_argument("--root", help="with --grid: the job's version root (results, ...)")
        p.add_argument("--layout", help="with --grid: the job's layout")
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
    from pipeline_lib.baseline import add_commands  # gate, findings-table, reproducers

    add_commands(sub)
    args = parser.parse_args(argv)
    if args.command in ("save", "load"):
        if args.spec:
            spec = json.loads(args.spec)
        elif not (args.root and args.layout):
            parser.error("--grid needs --root and --layout")
        else:
            job = grid.save_job_spec if args.command == "save" else grid.load_job_spec
            spec = job(json.loads(args.grid), args.root, args.layout)
        (cmd_save if args.command == "save" else cmd_load)(spec)
    elif args.command == "aggregate":
        cmd_aggregate(args)
    elif args.command == "selftest":
        cmd_selftest(args)
    elif args.command == "make-env":
        cmd_make_env(args)
    elif hasattr(args, "handler"):  # the commands of pipeline_lib.baseline
        sys.exit(args.handler(args))
    else:
        cmd_check_config(args)
