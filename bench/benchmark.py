"""Benchmark dcp-matrix against its limits; prints figures and ratios (run on purpose, not in CI).

    .venv/bin/python bench/benchmark.py                # all six; the matrix 3 times (~50 min)
    .venv/bin/python bench/benchmark.py --skip-matrix  # all but the matrix and the rerun
    .venv/bin/python bench/benchmark.py --only rerun   # the matrix, then + mlp_frozen
    .venv/bin/python bench/benchmark.py --state-gb 1 --repeats 3
    .venv/bin/python bench/benchmark.py --only aggregate  # one of them alone
    .venv/bin/python bench/benchmark.py --only growth --sweep-gb 0.25,1,4 --growth-repeats 3

1. matrix: wall time of the matrix (``--config``, median of ``--repeats`` runs) ÷ Σ over its jobs
   of the no-op torchrun floor at that job's world size (the floors measured here, median of
   ``--repeats``);
2. big cell: one fsdp2 cell with a ``--state-gb`` state, in exact and in sealed mode
   (``verify.reference``): save + load + verification phases of the pipeline's own jobs ÷ a bare
   ``dcp.save`` + ``dcp.load`` of the same state; peak RSS per rank ÷ the rank's share of the
   state; the extra disk (reference or seal) ÷ the state;
3. ``snakemake -n`` on a generated 10,000-cell grid;
4. aggregating 10,000 cell records into Parquet and rendering the report;
5. growth: the big cell at each ``--sweep-gb`` size in both modes (and bare): seconds per GB of
   each phase, peak RSS per rank, and the spread of the per-GB cost across the sweep;
6. rerun: the matrix of ``--config``, then the same with ``--rerun-model`` added, in one folder:
   the rerun's wall time ÷ the full run's (incremental reruns, pipeline_lib.job.reuse).

``--device cuda`` runs the big cell and the growth sweep on GPUs (nccl; two visible GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
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

from pipeline_lib.common.atomic import read_json  # noqa: E402
from pipeline_lib.job import launcher  # noqa: E402
from pipeline_lib.plan import config as config_lib  # noqa: E402
from pipeline_lib.plan import grid  # noqa: E402


def timed(command: list[str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    # This checkout's pipeline_lib, also where the environment's editable install names another
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env)
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
    runs = []
    for attempt in range(repeats):
        run_dir = work / f"matrix-{attempt}"
        run_dir.mkdir()
        shutil.copy(config_path, run_dir / "config.yaml")
        wall = timed(snakemake_command(run_dir), work)[0]
        results = run_dir / grid.RESULTS
        runs.append({"wall": wall, "phases": cells_work(results), **job_times(results)})
        statuses = Counter(
            cell["status"]
            for path in (results / "load").glob("*/*.json")
            for cell in read_json(path)["cells"]
        )
        print(f"   run {attempt + 1}: {wall:.1f} s; cells {dict(sorted(statuses.items()))}")
        shutil.rmtree(run_dir)
    run = sorted(runs, key=lambda r: r["wall"])[len(runs) // 2]  # the median run, whole
    print("1. matrix overhead: wall time vs the work (no-op floors + the recorded phases)")
    for n in sorted(floor):
        print(f"   no-op torchrun floor, {n} rank(s): {floor[n]:.2f} s (median of {repeats}); "
              f"{jobs[n]} jobs")  # fmt: skip
    work_s = floor_sum + run["phases"]
    walls = ", ".join(f"{r['wall']:.1f}" for r in runs)
    print(
        f"   median run: wall {run['wall']:.1f} s (runs {walls}); "
        f"Σ floors {floor_sum:.1f} s + Σ phases {run['phases']:.1f} s = {work_s:.1f} s"
    )
    print(f"   ratio: {run['wall'] / work_s:.2f} (target <= {OVERHEAD_TARGET})")
    overhead(run, floor_sum)


def job_times(results: Path) -> dict:
    """Σ over the matrix's save and load jobs of the lines their logs end with
    (pipeline_lib.job.driver.JobClock): job, prepare, ranks and records seconds, and launches."""
    pattern = re.compile(
        r"job time ([\d.]+) s: prepare ([\d.]+) s, ranks ([\d.]+) s \((\d+) launch\(es\)\), "
        r"records (-?[\d.]+) s"
    )
    total = dict.fromkeys(("job", "prepare", "ranks", "launches", "records"), 0.0)
    for log in (results / "logs").glob("*/*.log"):
        if found := pattern.search(log.read_text()):
            for key, value in zip(total, found.groups(), strict=True):
                total[key] += float(value)
    return total


def overhead(run: dict, floor_sum: float) -> None:
    """Where the wall time beyond the work goes (one run's figures)."""
    beyond = run["ranks"] - floor_sum - run["phases"]
    print(
        f"   where the rest ({run['wall'] - floor_sum - run['phases']:.1f} s) goes: inside the "
        f"ranks beyond floors and phases (imports beyond the floor's, model builds outside a "
        f"phase, teardown; below 0 when the launches start faster than a no-op torchrun job) "
        f"{beyond:.1f} s over {run['launches']:.0f} launches; the jobs' own "
        f"processes {run['prepare']:.1f} s preparing + {run['records']:.1f} s writing records; "
        f"Snakemake (its start, scheduling, aggregate and report) "
        f"{run['wall'] - run['job']:.1f} s"
    )
    print(
        f"   without the floors: wall ÷ Σ phases {run['wall'] / run['phases']:.2f}; the "
        f"launches outside their phases (start-up, builds, teardown) "
        f"{run['ranks'] - run['phases']:.1f} s, "
        f"{(run['ranks'] - run['phases']) / max(run['launches'], 1):.2f} s each; ranks started "
        f"by {launcher.rank_start()} ({launcher.RANK_START_ENV})"
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


# The pipeline's phases of a cell that do the checkpointing and the checks (records' timing),
# without training, building and resuming, which the bare job does not do either.
CELL_PHASES = {
    "reference": ("save", "reference_s"),
    "state check": ("save", "state_check_s"),
    "save": ("save", "save_s"),
    "files check": ("save", "files_check_s"),
    "seal": ("save", "seal_s"),
    "seal check": ("load", "seal_check_seconds"),
    "load": ("load", "load_seconds"),
    "verify": ("load", "verify_seconds"),
}
OVERHEAD_TARGET = 1.10  # matrix wall ÷ (Σ no-op floors + Σ recorded phases)
TARGETS = {"exact": 1.6, "sealed": 1.35}  # cell ÷ bare dcp.save + dcp.load, at 1 GB
RSS_MARGIN = 0.3  # exact mode: peak RSS per rank ÷ its share <= bare's + this
EXTRA_DISK = 0.01  # sealed mode: what it writes beside the checkpoint <= 1 % of the state
GROWTH_SPREAD = 0.20  # per-GB cost within 20 % across the sweep


def mlp_size(state_gb: float) -> dict:
    """The benchmark's mlp of about ``state_gb`` of state: parameters + Adam's exp_avg and
    exp_avg_sq, float32; 2 blocks of 2 dim x hidden."""
    dim = 2048
    return {"dim": dim, "hidden": max(8, round(state_gb * 2**30 / (3 * 4 * 4 * dim))), "out": 8}


BIG_CELL = {
    "models": ["mlp"],
    "layouts": {"fsdp2_2": {"framework": "fsdp2", "mesh": [2]}},
    "pairs": "same",
}


def run_cell(state_gb: float, reference: str, work: Path, device: str = "cpu") -> dict:
    """One fsdp2_2 cell of about ``state_gb`` through the pipeline's save and load jobs in mode
    ``reference`` (exact or sealed): its phases' seconds, state bytes, extra disk (what it
    writes beside the checkpoint: the saver's reference, or the seal) and peak RSS per rank."""
    run = {"device": device}
    cfg = config_lib.validate({**BIG_CELL, "verify": {"reference": reference}, "run": run})
    cell_dir = work / f"cell-{reference}-{state_gb}"
    cell_dir.mkdir()
    for command, spec in (
        ("save", grid.save_job_spec(cfg, grid.RESULTS, "fsdp2_2")),
        ("load", grid.load_job_spec(cfg, grid.RESULTS, "fsdp2_2")),
    ):
        (item,) = spec.items
        spec = replace(spec, items=(replace(item, model_kwargs=mlp_size(state_gb)),))
        as_json = json.dumps(spec.to_dict())
        timed([sys.executable, "-m", "pipeline_lib", command, "--spec", as_json], cell_dir)
    save = read_json(cell_dir / grid.save_record_path("mlp", "fsdp2_2"))
    (row,) = read_json(cell_dir / grid.load_record_path("mlp", "fsdp2_2"))["cells"]
    if row["status"] != "pass":
        raise RuntimeError(f"the big cell ({reference}) did not pass: {row['reason']}")
    records = {"save": save["timing"], "load": row}
    phases = {name: records[side].get(key) or 0.0 for name, (side, key) in CELL_PHASES.items()}
    folder = cell_dir / grid.save_dir("mlp", "fsdp2_2")
    written = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    shutil.rmtree(cell_dir)
    return {
        "phases": phases,
        "seconds": sum(phases.values()),
        "state_bytes": save["checkpoint_bytes"],
        "extra_bytes": written - save["checkpoint_bytes"],
        "rss_mb": max(row["save_peak_rss_mb"], row["load_peak_rss_mb"]),
    }


def run_bare(state_gb: float, work: Path, device: str = "cpu") -> dict:
    """A bare dcp.save + dcp.load of the big cell's state, trained as many steps as the cell
    trains before its save (the default ``train.steps``): both peak RSS figures hold the same
    training, so their difference is what the cell's checkpointing and checks add."""
    size, steps = mlp_size(state_gb), config_lib.validate(BIG_CELL)["train"]["steps"]
    args = ("dcp", str(size["dim"]), str(size["hidden"]), device, str(steps))
    _, bare = torchrun(2, *args, cwd=work)
    shutil.rmtree(bare["checkpoint"])
    return {"seconds": bare["save_s"] + bare["load_s"], **bare}


def per_rank(cell: dict) -> float:
    """Peak RSS per rank ÷ the rank's share of the state (2 ranks)."""
    return cell["rss_mb"] / (cell["state_bytes"] / 2 / 2**20)


def bench_big_cell(state_gb: float, repeats: int, work: Path, device: str) -> None:
    """One fsdp2_2 cell of about ``state_gb``, ``repeats`` times in each mode and as a bare
    dcp.save + dcp.load: each figure beside its target."""
    runs: dict[str, list] = {"exact": [], "sealed": [], "bare": []}
    for attempt in range(repeats):
        bare = run_bare(state_gb, work, device)
        runs["bare"].append(bare)
        for mode in ("exact", "sealed"):
            cell = run_cell(state_gb, mode, work, device)
            runs[mode].append(cell)
            spent = ", ".join(f"{k} {v:.2f}" for k, v in cell["phases"].items() if v)
            print(
                f"   run {attempt + 1} {mode}: state {cell['state_bytes'] / 2**30:.2f} GiB; "
                f"{cell['seconds']:.2f} s ({spent}); bare {bare['seconds']:.2f} s; peak RSS "
                f"per rank {cell['rss_mb']:.0f} MB (bare {bare['peak_rss_mb']:.0f} MB)"
            )
    bare_s = statistics.median(b["seconds"] for b in runs["bare"])
    state = statistics.median(c["state_bytes"] for c in runs["exact"])
    bare_rss = statistics.median(b["peak_rss_mb"] / (state / 2 / 2**20) for b in runs["bare"])
    print(f"2. big cell ({state_gb:g} GB, fsdp2_2 on {device}, medians of {repeats}):")
    for mode in ("exact", "sealed"):
        cells = runs[mode]
        ratio = statistics.median(c["seconds"] for c in cells) / bare_s
        rss = statistics.median(map(per_rank, cells))
        extra = statistics.median(c["extra_bytes"] / c["state_bytes"] for c in cells)
        print(
            f"   {mode}: time ÷ bare {ratio:.2f} (target <= {TARGETS[mode]}); peak RSS per "
            f"rank ÷ its share {rss:.2f} (bare {bare_rss:.2f}; target <= "
            f"{bare_rss + RSS_MARGIN:.2f} in exact mode); extra disk {extra:.2%} of the state"
            + (f" (target <= {EXTRA_DISK:.0%})" if mode == "sealed" else "")
        )


def bench_growth(sizes: list[float], repeats: int, work: Path, device: str) -> None:
    """The cell at every size of ``sizes`` (GB) in both modes, ``repeats`` times (the median run
    of each): seconds per GB of each phase and peak RSS per rank; the spread of the per-GB cost
    across the sweep, of the whole cell and of what the pipeline adds to DCP's own save and load
    (the phases but ``save`` and ``load``)."""
    print(
        f"5. growth sweep ({', '.join(f'{g:g}' for g in sizes)} GB; fsdp2_2; median of "
        f"{repeats} run(s) each)"
    )
    for mode in ("exact", "sealed", "bare"):
        per_gb, added_gb = [], []
        for gb in sizes:
            cell = _median_run(mode, gb, repeats, work, device)
            state_gb = (cell.get("state_bytes") or gb * 2**30) / 2**30
            per_gb.append(cell["seconds"] / state_gb)
            phases = cell.get("phases", {"save": cell.get("save_s"), "load": cell.get("load_s")})
            added = sum(v for k, v in phases.items() if k not in ("save", "load"))
            added_gb.append(added / state_gb)
            shown = ", ".join(f"{k} {v / state_gb:.2f}" for k, v in phases.items() if v)
            rss = cell.get("rss_mb", cell.get("peak_rss_mb"))
            print(
                f"   {mode} {gb:g} GB: {per_gb[-1]:.2f} s/GB ({shown}); peak RSS per rank "
                f"{rss:.0f} MB ({rss / (state_gb * 1024 / 2):.2f} x its share)"
            )
        spread = max(per_gb) / min(per_gb) - 1
        line = f"   {mode}: per-GB cost spread {spread:.0%} across the sweep"
        if mode != "bare":
            line += f", of the phases beside DCP's save and load {_spread(added_gb)}"
        print(f"{line} (target <= {GROWTH_SPREAD:.0%})")


def _median_run(mode: str, gb: float, repeats: int, work: Path, device: str) -> dict:
    """The run of median seconds of ``repeats`` runs of the cell (``mode``) or the bare job."""
    runs = [
        run_bare(gb, work, device) if mode == "bare" else run_cell(gb, mode, work, device)
        for _ in range(repeats)
    ]
    return sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]


def _spread(values: list[float]) -> str:
    return f"{max(values) / min(values) - 1:.0%}" if min(values) > 0 else "n/a"


def bench_rerun(config_path: Path, model: str, work: Path) -> None:
    """5. The matrix of ``config_path``, then the same with ``model`` added to ``models:`` in
    the same folder: the rerun's wall time ÷ the full run's, and the units each reused."""
    run_dir = work / "rerun"
    run_dir.mkdir()
    cfg = yaml.safe_load(config_path.read_text())
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    full = timed(snakemake_command(run_dir), work)[0]
    full_phases = cells_work(run_dir / grid.RESULTS)
    cfg["models"] = [*cfg["models"], model]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    rerun = timed(snakemake_command(run_dir), work)[0]
    counts = Counter()
    for log in (run_dir / grid.RESULTS / "logs").glob("*/*.log"):
        if found := re.search(r"reused (\d+) of (\d+) (save items|load cells)", log.read_text()):
            counts[found[3], "reused"] += int(found[1])
            counts[found[3], "all"] += int(found[2])
    print("5. incremental rerun: the matrix, then + one model in the same folder")
    print(f"   full run {full:.1f} s; + {model}: {rerun:.1f} s")
    times, phases = job_times(run_dir / grid.RESULTS), cells_work(run_dir / grid.RESULTS)
    print(
        f"   the rerun's jobs: {times['job']:.1f} s in all ({times['prepare']:.1f} s preparing, "
        f"{times['ranks']:.1f} s in {times['launches']:.0f} launches of which the new units' "
        f"phases {phases - full_phases:.1f} s, {times['records']:.1f} s records); Snakemake "
        f"and its other rules {rerun - times['job']:.1f} s"
    )
    for kind in ("save items", "load cells"):
        reused, total = counts[kind, "reused"], counts[kind, "all"]
        print(f"   {kind}: {total - reused} of {total} ran, {reused} reused")
    print(f"   ratio: {rerun / full:.2f} (target <= 0.4)")
    shutil.rmtree(run_dir)


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


BENCHMARKS = ("matrix", "big-cell", "dry-run", "aggregate", "growth", "rerun")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=REPO / "config.yaml", help="matrix to time")
    parser.add_argument(
        "--skip-matrix", action="store_true", help="skip benchmarks 1 and 6 (the long ones)"
    )
    parser.add_argument("--state-gb", type=float, default=1.0, help="state size of the big cell")
    parser.add_argument("--repeats", type=int, default=3, help="runs per floor and big cell")
    parser.add_argument(
        "--growth-repeats", type=int, default=1, help="runs per size of the growth sweep (median)"
    )
    parser.add_argument("--only", choices=BENCHMARKS, help="run this benchmark alone")
    parser.add_argument(
        "--sweep-gb", default="0.25,1,4", help="state sizes of the growth sweep (GB, commas)"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the big cell and the growth sweep run")  # fmt: skip
    parser.add_argument("--rerun-model", default="mlp_frozen", help="the model the rerun adds")
    args = parser.parse_args()
    skipped = {"matrix", "rerun"} if args.skip_matrix else set()
    run = {args.only} if args.only else set(BENCHMARKS) - skipped
    work = Path(tempfile.mkdtemp(prefix="dcp-matrix-bench-"))
    if "SLURM_CONF" not in os.environ:
        # Snakemake's Slurm plugin asks scontrol for the cluster's configuration at every start;
        # with Slurm's client and no controller that waits 10 s (docs/slurm.md). The benchmark
        # runs Snakemake locally: a file without a cluster makes scontrol answer at once.
        (work / "no-slurm.conf").touch()
        os.environ["SLURM_CONF"] = str(work / "no-slurm.conf")
        print("   (SLURM_CONF set to an empty file: no 10 s Slurm probe per Snakemake start)")
    try:
        if "matrix" in run:
            bench_matrix(args.config.resolve(), args.repeats, work)
        if "big-cell" in run:
            bench_big_cell(args.state_gb, args.repeats, work, args.device)
        if "dry-run" in run:
            bench_dry_run(work)
        if "aggregate" in run:
            # A real record of the default matrix (transformer, ddp_2 -> fsdp2_4) as the template.
            bench_aggregate(work, REPO / "bench" / "load_record.json")
        if "growth" in run:
            sizes = [float(g) for g in args.sweep_gb.split(",")]
            bench_growth(sizes, args.growth_repeats, work, args.device)
        if "rerun" in run:
            bench_rerun(args.config.resolve(), args.rerun_model, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
