"""Run save and load jobs through the CLI, as Snakemake does (helpers for the torchrun tests)."""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from pipeline_lib.plan import config, grid
from pipeline_lib.plan.specs import JobSpec, Source
from pipeline_lib.verify.results import LoadRecord, LoadResult, SaveRecord, SaveResult
from tests import procs
from tests.record_schemas import read_checked


def cli(command: str, spec: JobSpec) -> str:
    """Run one job; its output (the job's log)."""
    proc = procs.run(
        [sys.executable, "-m", "pipeline_lib", command, "--spec", json.dumps(spec.to_dict())],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


# Two jobs at a time, as the Snakemake tests run them (tests/test_snakemake.py: CORES): a small
# job spends most of its time in its fork server's imports, on one core.
JOBS_AT_ONCE = 2


def cli_all(command: str, specs: list[JobSpec]) -> None:
    """``cli(command, spec)`` for every spec, ``JOBS_AT_ONCE`` at a time (the jobs of one side
    are independent: each writes its own records and folders)."""
    with ThreadPoolExecutor(JOBS_AT_ONCE) as pool:
        for done in [pool.submit(cli, command, spec) for spec in specs]:
            done.result()


def run_matrix(
    raw_config: dict,
    model: str = "mlp",
    save_faults: dict | None = None,
    load_faults: dict | None = None,
) -> dict[tuple[str, str], dict]:
    """Save under every save layout, load under every load layout, one job each as Snakemake
    runs them, for a config of one model: {(save, load): row}. ``save_faults``: {save layout:
    fault}; ``load_faults``: {(save, load layout): fault}."""
    cfg = config.validate(raw_config)
    assert cfg["models"] == [model], "run_matrix takes a config of that one model"
    save_faults, load_faults = save_faults or {}, load_faults or {}
    saves = []
    for _, layout in grid.save_jobs(cfg):
        spec = grid.save_job_spec(cfg, grid.RESULTS, layout)
        faulty = tuple(replace(item, fault=save_faults.get(layout)) for item in spec.items)
        saves.append(replace(spec, items=faulty))
    cli_all("save", saves)
    loads = []
    for _, layout in grid.load_jobs(cfg):
        spec = grid.load_job_spec(cfg, grid.RESULTS, layout)
        faulty = tuple(
            replace(item, sources=tuple(with_fault(s, layout, load_faults) for s in item.sources))
            for item in spec.items
        )
        loads.append(replace(spec, items=faulty))
    cli_all("load", loads)
    check_written(saves + loads)
    rows = {}
    for spec in loads:
        for item in spec.items:  # one per variant (its own root): the first variant's rows
            for row in read_checked(item.record, LoadRecord).cells:
                rows.setdefault((row["save_layout"], row["load_layout"]), row)
    return rows


def check_written(specs: list[JobSpec]) -> None:
    """Every record and every unit's result the jobs wrote holds to its schema in
    tests/schemas and reads back as the pipeline's type (tests.record_schemas)."""
    for spec in specs:
        record, result = (
            (SaveRecord, SaveResult) if spec.kind == "save" else (LoadRecord, LoadResult)
        )
        for item in spec.items:
            read_checked(item.record, record)
        for path in sorted(Path(spec.work_dir).glob("results/*.json")):
            read_checked(path, result)


def with_fault(source: Source, layout: str, load_faults: dict) -> Source:
    """``source`` with the load fault given for its (save layout, load layout), if any."""
    return replace(source, fault=load_faults.get((source.layout.name, layout)))


def tensors(model: str, load_layout: str) -> list[dict]:
    return read_checked(grid.load_record_path(model, load_layout), LoadRecord).tensors


def run_grid(
    raw_config: dict, load_fault: str | None = None, save_fault: str | None = None
) -> dict[tuple[str, str, str, str], dict]:
    """Every save job, then every load job, of a config's grid (all variants and models):
    {(variant id, model, save layout, load layout): row}. ``load_fault``: injected into the load
    of every cell; ``save_fault``: into every save item."""
    cfg = config.validate(raw_config)
    saves = []
    for version_root, layout in grid.save_jobs(cfg):
        spec = grid.save_job_spec(cfg, version_root, layout)
        items = tuple(replace(item, fault=save_fault) for item in spec.items)
        saves.append(replace(spec, items=items))
    cli_all("save", saves)
    loads = []
    for version_root, layout in grid.load_jobs(cfg):
        spec = grid.load_job_spec(cfg, version_root, layout)
        items = tuple(
            replace(item, sources=tuple(replace(s, fault=load_fault) for s in item.sources))
            for item in spec.items
        )
        loads.append(replace(spec, items=items))
    cli_all("load", loads)
    check_written(saves + loads)
    rows = {}
    for version_root, layout in grid.load_jobs(cfg):
        records = grid.load_outputs(cfg, version_root, layout)
        for (variant, model), record in zip(grid.items(cfg), records, strict=True):
            for row in read_checked(record, LoadRecord).cells:
                rows[variant.id, model, row["save_layout"], row["load_layout"]] = row
    return rows


def probe(args: list[str]) -> dict:
    """A served rank's view of itself (the launcher's ``target`` in test_torchrun.py)."""
    import torch

    return {"env": dict(os.environ), "args": args, "threads": torch.get_num_threads()}


def ends_then_hangs(args: list[str]) -> None:
    """A served rank that marks its end (``args[0]``: the work folder) and, on rank 1, never
    exits (the launcher's target in test_launcher.py)."""
    import time

    from pipeline_lib.job import launcher

    rank = int(os.environ["RANK"])
    launcher.mark_ended(args[0], rank, "ok")
    while rank == 1:
        time.sleep(60)


def raises_on_one_rank(args: list[str]) -> None:
    """A served rank in load cell ``u1`` (``args[0]``: the work folder): rank 0 marks its
    progress there and waits for ever (as in a collective), rank 1 raises inside it, writes
    that down (launcher.mark_raised) and waits too (the launcher's target in test_launcher.py)."""
    import time

    from pipeline_lib.common.atomic import write_json
    from pipeline_lib.job import launcher

    rank = int(os.environ["RANK"])
    if rank == 0:
        write_json(Path(args[0]) / "progress.json", {"step": "cell a", "unit": "u1", "at": 0})
    else:
        time.sleep(1)
        launcher.mark_raised(args[0], rank, "u1", "cell a", "ValueError: only on rank 1")
    while True:
        time.sleep(60)
