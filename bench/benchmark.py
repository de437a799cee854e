"""Benchmark dcp-matrix against its limits; prints figures and ratios (run on purpose, not in CI).

    .venv/bin/python bench/benchmark.py                # all four; the matrix 3 times (~35 min)
    .venv/bin/python bench/benchmark.py --skip-matrix  # the three quick ones
    .venv/bin/python bench/benchmark.py --state-gb 1 --repeats 3
    .venv/bin/python bench/benchmark.py --only aggregate  # one of them alone

1. matrix: wall time of the matrix (``--config``, median of ``--repeats`` runs) ÷ Σ over its jobs
   of the no-op torchrun floor at that job's world size (the floors measured here, median of
   ``--repeats``);
2. big cell: one fsdp2 cell with a ``--state-gb`` state: save + load + verification phases of the
   pipeline's own jobs ÷ a bare ``dcp.save`` + ``dcp.load`` of the same state; peak RSS per rank ÷
   the rank's share of the state;
3. ``snakemake -n`` on a generated 10,000-cell grid;
4. aggregating 10,000 cell records into Parquet and rendering the report.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))

from pipeline_lib import config as config_lib  # noqa: E402
from pipeline_lib import grid  # noqa: E402
from pipeline_lib.atomic import read_json  # noqa: E402


def timed(command: list[str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{command[:4]} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return elapsed, proc.stdout


def torchrun(world_size: int, *args: str, cwd: Path) -> tuple[float, dict]:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={world_size}",
        str(REPO / "bench" / "bare_dcp.py"),
        *args,
    ]
    elapsed, out = timed(command, cwd)
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    return elapsed, json.loads(line.removeprefix("RESULT "))


def snakemake_command(run_dir: Path, *extra: str) -> list[str]:
    return [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(run_dir),
            "--cores", "2", "--configfile", str(run_dir / "config.yaml"), *extra]  # fmt: skip


def floors(world_sizes: set[int], repeats: int, work: Path) -> dict[int, float]:
    return {
        n: statistics.median(torchrun(n, "noop", cwd=work)[0] for _ in range(repeats))
        for n in sorted(world_sizes)
    }


def bench_matrix(config_path: Path, repeats: int, work: Path) -> None:
    cfg = config_lib.load(config_path)
    layouts = grid.layouts(cfg)
    jobs = Counter(
        layouts[name].world_size for _, name in [*grid.save_jobs(cfg), *grid.load_jobs(cfg)]
    )
    floor = floors(set(jobs), repeats, work)
    floor_sum = sum(floor[n] * count for n, count in jobs.items())
    walls, work_s = [], []
    for attempt in range(repeats):
        run_dir = work / f"matrix-{attempt}"
        run_dir.mkdir()
        shutil.copy(config_path, run_dir / "config.yaml")
        walls.append(timed(snakemake_command(run_dir), work)[0])
        work_s.append(cells_work(run_dir / grid.RESULTS))
        statuses = Counter(
            cell["status"]
            for path in (run_dir / grid.RESULTS / "load").glob("*/*.json")
            for cell in read_json(path)["cells"]
        )
        print(f"   run {attempt + 1}: {walls[-1]:.1f} s; cells {dict(sorted(statuses.items()))}")
        shutil.rmtree(run_dir)
    wall = statistics.median(walls)
    print("1. matrix wall time vs the torchrun floor")
    for n in sorted(floor):
        print(
            f"   no-op torchrun floor, {n} rank(s): {floor[n]:.2f} s "
            f"(median of {repeats}); {jobs[n]} jobs"
        )
    print(
        f"   Σ floors over {sum(jobs.values())} jobs: {floor_sum:.1f} s; matrix wall time: "
        f"{wall:.1f} s (median of {', '.join(f'{w:.1f}' for w in walls)})"
    )
    cells = statistics.median(work_s)
    print(f"   ratio: {wall / floor_sum:.2f} (target <= 1.3)")
    print(
        f"   the items' and cells' own phases (records; median {cells:.1f} s) put a pipeline "
        f"with no overhead at all at (Σ floors + {cells:.1f} s) / Σ floors = "
        f"{(floor_sum + cells) / floor_sum:.2f}"
    )


# Phases of a save item and of a load cell (records' timing), start-up excluded.
SAVE_PHASES = (
    "build_s", "train_s", "reference_s", "state_check_s", "save_s", "resume_s", "files_check_s",
)  # fmt: skip
LOAD_PHASES = ("load_build_seconds", "load_seconds", "verify_seconds", "resume_seconds")


def cells_work(results: Path) -> float:
    """Σ of the phases every save item and load cell of a matrix run recorded."""
    total = 0.0
    for path in (results / "save").glob("*/*.json"):
        timing = read_json(path).get("timing", {})
        total += sum(timing.get(phase, 0.0) for phase in SAVE_PHASES)
    for path in (results / "load").glob("*/*.json"):
        for cell in read_json(path)["cells"]:
            total += sum(cell.get(phase) or 0.0 for phase in LOAD_PHASES)
    return total


def bench_big_cell(state_gb: float, repeats: int, work: Path) -> None:
    """One fsdp2_2 cell of about ``state_gb`` of state, ``repeats`` times through the pipeline's
    save and load jobs and through bare dcp.save + dcp.load: the time and peak memory ratios.
    Long for a reason: a benchmark read top to bottom, set-up, runs and printout in one place."""
    dim = 2048
    # state = parameters + Adam's exp_avg and exp_avg_sq, float32; 2 blocks of 2 dim x hidden.
    hidden = max(8, round(state_gb * 2**30 / (3 * 4 * 4 * dim)))
    cfg = config_lib.validate(
        {
            "models": ["mlp"],
            "layouts": {"fsdp2_2": {"framework": "fsdp2", "mesh": [2]}},
            "pairs": "same",
        }
    )
    ratios, rss, bare_rss = [], [], []
    for attempt in range(repeats):
        cell_dir = work / f"cell-{attempt}"
        cell_dir.mkdir()
        for command, spec in (
            ("save", grid.save_job_spec(cfg, grid.RESULTS, "fsdp2_2")),
            ("load", grid.load_job_spec(cfg, grid.RESULTS, "fsdp2_2")),
        ):
            (item,) = spec.items
            item = replace(item, model_kwargs={"dim": dim, "hidden": hidden, "out": 8})
            spec = replace(spec, items=(item,))
            as_json = json.dumps(spec.to_dict())
            timed(
                [sys.executable, "-m", "pipeline_lib", command, "--spec", as_json],
                cell_dir,
            )
        save = read_json(cell_dir / grid.save_record_path("mlp", "fsdp2_2"))
        (row,) = read_json(cell_dir / grid.load_record_path("mlp", "fsdp2_2"))["cells"]
        if row["status"] != "pass":
            raise RuntimeError(f"the big cell did not pass: {row['reason']}")
        state_bytes = save["checkpoint_bytes"]
        _, bare = torchrun(2, "dcp", str(dim), str(hidden), cwd=work)
        shutil.rmtree(bare["checkpoint"])
        t = save["timing"]
        pipeline_s = (
            t["reference_s"]
            + t["state_check_s"]
            + t["save_s"]
            + t["files_check_s"]
            + row["load_seconds"]
            + row["verify_seconds"]
        )
        bare_s = bare["save_s"] + bare["load_s"]
        ratios.append(pipeline_s / bare_s)
        rank_state_mb = state_bytes / 2 / 2**20
        rss.append(max(row["save_peak_rss_mb"], row["load_peak_rss_mb"]) / rank_state_mb)
        bare_rss.append(bare["peak_rss_mb"] / rank_state_mb)
        print(
            f"   run {attempt + 1}: state {state_bytes / 2**30:.2f} GiB; "
            f"pipeline {pipeline_s:.2f} s (reference {t['reference_s']:.2f}, "
            f"state check {t['state_check_s']:.2f}, "
            f"save {t['save_s']:.2f}, files check {t['files_check_s']:.2f}, "
            f"load {row['load_seconds']:.2f}, verify {row['verify_seconds']:.2f}); "
            f"bare save {bare['save_s']:.2f} + load {bare['load_s']:.2f} s; peak RSS per rank "
            f"save {row['save_peak_rss_mb']:.0f} / load {row['load_peak_rss_mb']:.0f} / bare "
            f"{bare['peak_rss_mb']:.0f} MB"
        )
        shutil.rmtree(cell_dir)
    print(
        f"2. big cell: ratio {statistics.median(ratios):.2f} "
        f"(median of {repeats}; target <= 1.25); "
        f"peak RSS per rank / rank's state {statistics.median(rss):.2f} "
        f"(bare dcp.save + dcp.load: {statistics.median(bare_rss):.2f})"
    )


def ten_thousand_cell_config(path: Path) -> dict:
    frameworks = [("ddp", [2]), ("fsdp2", [2]), ("fsdp1", [2]), ("single", [1]), ("fsdp2", [4])]
    layouts = {
        f"l{i:02d}": {"framework": fw, "mesh": mesh} for i, (fw, mesh) in enumerate(frameworks * 10)
    }
    cfg = {"models": ["mlp", "mlp_uneven", "transformer", "tied_embedding"], "layouts": layouts}
    path.write_text(yaml.safe_dump(cfg))
    return config_lib.validate(cfg)


def bench_dry_run(work: Path) -> None:
    run_dir = work / "dry-run"
    run_dir.mkdir()
    cfg = ten_thousand_cell_config(run_dir / "config.yaml")
    wall, _ = timed(snakemake_command(run_dir, "-n", "--quiet"), work)
    print(f"3. snakemake -n on {len(grid.cells(cfg))} cells: {wall:.1f} s (target <= 30 s)")


def bench_aggregate(work: Path, template_record: Path) -> None:
    """10,000 cells made from one real load record (its first cell and tensor rows, renamed),
    aggregated and rendered. Long for a reason: a benchmark script read top to bottom, set-up,
    timed commands and printout in one place."""
    run_dir = work / "aggregate"
    (run_dir / "records").mkdir(parents=True)
    cfg = ten_thousand_cell_config(run_dir / "config.yaml")
    record = read_json(template_record)
    cell = record["cells"][0]
    tensors = [t for t in record["tensors"] if t["save_layout"] == cell["save_layout"]]
    paths = []
    for model in cfg["models"]:
        for load in cfg["layouts"]:
            keys = [
                {"model": model, "save_layout": save, "load_layout": load}
                for save in cfg["layouts"]
            ]
            out = {
                "cells": [{**cell, **k} for k in keys],
                "tensors": [{**t, **k} for k in keys for t in tensors],
            }
            paths.append(run_dir / "records" / f"{model}-{load}.json")
            paths[-1].write_text(json.dumps(out))
    aggregate_s, _ = timed(
        [
            sys.executable,
            "-m",
            "pipeline_lib",
            "aggregate",
            "--matrix",
            "m.parquet",
            "--tensors",
            "t.parquet",
            *map(str, paths),
        ],
        run_dir,
    )
    report_s, _ = timed(
        [
            sys.executable,
            "-m",
            "pipeline_lib",
            "report",
            "--matrix",
            "m.parquet",
            "--tensors",
            "t.parquet",
            "--configfile",
            "config.yaml",
            "--html",
            "report.html",
            "--markdown",
            "summary.md",
        ],
        run_dir,
    )
    print(
        f"4. aggregate {len(cfg['models']) * len(cfg['layouts']) ** 2} cells "
        f"({len(tensors)} entries each): {aggregate_s:.1f} s; report: {report_s:.1f} s; "
        f"total {aggregate_s + report_s:.1f} s (target <= 10 s)"
    )


BENCHMARKS = ("matrix", "big-cell", "dry-run", "aggregate")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=REPO / "config.yaml", help="matrix to time")
    parser.add_argument(
        "--skip-matrix", action="store_true", help="skip benchmark 1 (the long one)"
    )
    parser.add_argument("--state-gb", type=float, default=1.0, help="state size of the big cell")
    parser.add_argument("--repeats", type=int, default=3, help="runs per floor and big cell")
    parser.add_argument("--only", choices=BENCHMARKS, help="run this benchmark alone")
    args = parser.parse_args()
    skipped = {"matrix"} if args.skip_matrix else set()
    run = {args.only} if args.only else set(BENCHMARKS) - skipped
    work = Path(tempfile.mkdtemp(prefix="dcp-matrix-bench-"))
    try:
        if "matrix" in run:
            bench_matrix(args.config.resolve(), args.repeats, work)
        if "big-cell" in run:
            bench_big_cell(args.state_gb, args.repeats, work)
        if "dry-run" in run:
            bench_dry_run(work)
        if "aggregate" in run:
            # A real record of the default matrix (transformer, ddp_2 -> fsdp2_4) as the template.
            bench_aggregate(work, REPO / "bench" / "load_record.json")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
