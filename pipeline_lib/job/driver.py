"""The parent side of a save or load job: launches the worker ranks, reruns the units a crash
left, writes the records.

A job's spec (JSON, built by pipeline_lib.plan.grid) names its items; the worker ranks
(pipeline_lib.job.worker, started by pipeline_lib.job.launcher) write one result per unit (an item
of a save job, a cell ``specs.unit_id(item, source)`` of a load job). This side turns the results
into records and always writes them, also when the job itself failed: a failing cell never stops the
matrix.

The load record holds the cell's verdict (records.cell_row, called here, in the load job). A
rerun reuses every unit whose inputs key is unchanged (pipeline_lib.job.reuse); the key includes the
project's code version, so a change to the verdict logic runs every cell again. A job told not
to reuse (``reuse_units=False``: config key ``reuse: false``, or its rule forced by Snakemake) runs
every unit and keeps their results for the next run.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from dataclasses import replace
from importlib import metadata
from pathlib import Path

import pipeline_lib
from pipeline_lib.common import timestamps
from pipeline_lib.common.atomic import read_json, write_json, write_text
from pipeline_lib.common.name_rule import inside
from pipeline_lib.job import reuse
from pipeline_lib.job.launcher import Outcome, launch, read_raised
from pipeline_lib.plan.specs import ItemSpec, JobSpec, Source
from pipeline_lib.verify.results import (
    CellRows,
    ImportRecord,
    LoadRecord,
    LoadResult,
    SaveRecord,
    SaveResult,
    result_type,
)

Result = SaveResult | LoadResult


def fresh_dir(path: Path) -> Path:
    """An empty folder at ``path``, which must lie inside the working directory (names.inside:
    a name like '..' never gets here, this is the last line of defence before rmtree)."""
    inside(path)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


class JobClock:
    """Where a job's process spends its time, for its log's last line: preparing (imports, the
    spec, reuse keys), the launches of the ranks (torchrun and everything in it) and writing
    the records. bench/benchmark.py sums these lines over a matrix."""

    def __init__(self) -> None:
        self.launches, self.ranks_s = 0, 0.0
        self.launched: float | None = None
        # `python -m pipeline_lib save|load`: from the package's import; called in-process
        # (tests), from here.
        as_cli = Path(sys.argv[0]).parent.name == "pipeline_lib"
        self.started = pipeline_lib.STARTED if as_cli else time.time()

    @contextlib.contextmanager
    def launch(self):
        started = time.time()
        self.launched = self.launched or started
        try:
            yield
        finally:
            self.launches += 1
            self.ranks_s += time.time() - started

    def report(self) -> None:
        ended = time.time()
        prepare = (self.launched or ended) - self.started
        records = ended - self.started - prepare - self.ranks_s
        print(
            f"dcp-matrix: job time {ended - self.started:.2f} s: prepare {prepare:.2f} s, "
            f"ranks {self.ranks_s:.2f} s ({self.launches} launch(es)), records {records:.2f} s",
            flush=True,
        )


def _run_worker(spec: JobSpec, work: Path, attempt: int, clock: JobClock) -> Outcome:
    """Launch the worker ranks for ``spec`` (a job): the launcher's outcome, with rank 0's
    own account of a job-level exception, which is more precise than the exit code."""
    spec = replace(spec, launched_at=time.time())
    spec_path = work / f"spec-{attempt}.json"
    write_json(spec_path, spec.to_dict())
    run = spec.run
    with clock.launch():
        outcome = launch(
            spec.layout.world_size,
            [str(spec_path)],
            work,
            run["cell_timeout_s"],
            run["startup_timeout_s"],
        )
    job_file = work / "results" / "job.json"
    if job_file.exists() and outcome.status == "error":
        reason = result_type(spec.kind).from_dict(read_json(job_file)).reason
        outcome.reason = f"{reason} (during {outcome.step or 'start-up'})"
    job_file.unlink(missing_ok=True)
    return outcome


def run_units(
    spec: JobSpec, work: Path, pending: list[str], clock: JobClock | None = None
) -> tuple[dict[str, Result], int]:
    """A result for every pending unit of the job, and the number of launches it took. One
    launch runs them all; after a crash or hang, the unit in progress is recorded as such and
    the units not reached run again in a fresh launch."""
    results: dict[str, Result] = {}
    attempt, clock, typed = 0, clock or JobClock(), result_type(spec.kind)
    while pending:
        attempt += 1
        outcome = _run_worker(spec.narrowed(set(pending)), work, attempt, clock)
        raised = read_raised(work)
        for unit in pending:
            path = work / "results" / f"{unit}.json"
            if path.exists():
                results[unit] = typed.from_dict(read_json(path))
            if unit in results and unit in raised and results[unit].status != "error":
                # A rank raised in it, rank 0 did not: not its verdict (launcher.RAISED_DIR).
                results[unit] = typed(status="error", reason=raised[unit].describe())
        left = [unit for unit in pending if unit not in results]
        if not left:
            break
        status, reason = outcome.status, outcome.reason
        if status == "ok":
            status, reason = "error", "worker ended without a result for this cell"
        if outcome.unit in left:
            results[outcome.unit] = typed(status=status, reason=reason)
        else:  # failed before its first unit: every unit not reached shares the failure
            results.update({unit: typed(status=status, reason=reason) for unit in left})
        pending = [unit for unit in left if unit not in results]
    return results, attempt


def checkpoint_size(path: Path) -> tuple[int, int]:
    """(bytes, files) of a checkpoint folder or file."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def torch_version() -> str:
    """The torch this job runs (its environment's; known even when every rank crashed)."""
    return metadata.version("torch")


# --- save jobs ------------------------------------------------------------------------------


def run_save_job(spec: JobSpec, reuse_units: bool = True) -> None:
    """Every item of a save job whose inputs changed (pipeline_lib.job.reuse; every item when not
    ``reuse_units``): one launch (more after a crash), then a record per item; an unchanged
    item's record is written again byte for byte and its folder left as it is."""
    from pipeline_lib.plan.disk_estimate import room_error

    work, clock = fresh_dir(Path(spec.work_dir)), JobClock()
    store = reuse.Store.of(spec, read=reuse_units)
    kept = {i.id: text for i in spec.items if store and (text := store.saved_record(i))}
    to_run = replace(spec, items=tuple(i for i in spec.items if i.id not in kept))
    if store:
        reuse.announce("save items", len(kept), len(spec.items), store)
    for item in to_run.items:
        fresh_dir(Path(item.save_dir))
    skipped = {i.id: SaveResult(status="skip", reason=i.skip) for i in to_run.items if i.skip}
    pending = [i.id for i in to_run.items if not i.skip]
    if no_room := room_error(to_run, work):
        results = {unit: SaveResult(status="error", reason=no_room) for unit in pending}
    else:
        results, _ = run_units(to_run, work, pending, clock)
    for item in spec.items:
        if item.id in kept:
            write_text(item.record, kept[item.id])
            continue
        record = save_record_of(item, skipped.get(item.id) or results[item.id])
        write_json(item.record, record.to_dict())
        if store:
            store.keep_saved(item)
    clock.report()


def save_record_of(item: ItemSpec, result: SaveResult) -> SaveRecord:
    """The record of one save item from the worker's result (or the job's failure)."""
    size = (None, None)
    if result.status == "ok":
        size = checkpoint_size(Path(item.paths.read_by(item.variant)))
    return SaveRecord.of(
        result, model=item.model, layout=item.layout, checkpoint=item.paths.checkpoint,
        reference=item.paths.reference, config_hash=item.config_hash,
        created_at=timestamps.now(), torch_version=torch_version(),
        checkpoint_bytes=size[0], checkpoint_files=size[1],
    )  # fmt: skip


# --- load jobs ------------------------------------------------------------------------------


def run_load_job(spec: JobSpec, reuse_units: bool = True) -> None:
    """Every cell of a load job whose inputs changed (pipeline_lib.job.reuse; every cell when not
    ``reuse_units``): one launch (more after a crash or hang), then one record per item, with
    the cells' verdicts (records.cell_row); an item none of whose cells ran gets its record
    again byte for byte."""
    from pipeline_lib.plan.disk_estimate import room_error

    work, clock = fresh_dir(Path(spec.work_dir)), JobClock()
    saves, results, to_run = _read_sources(spec)
    store = reuse.Store.of(spec, read=reuse_units)
    keys = _cell_keys(spec, store)
    kept = {unit: rows for unit, key in keys.items() if (rows := store.cell(key))}
    if store:
        reuse.announce("load cells", len(kept), len(keys), store)
    to_run = to_run.narrowed(set(to_run.units()) - set(kept))
    pending = to_run.units()
    if no_room := room_error(to_run, work):
        launched = {unit: LoadResult(status="error", reason=no_room) for unit in pending}
        launches = 0
    else:
        launched, launches = run_units(to_run, work, pending, clock)
    results.update(launched)
    for item in spec.items:
        rows = {
            item.unit(s): kept.get(item.unit(s)) or cell_rows(item, s, saves, results)
            for s in item.sources
        }
        _write_load_record(item, launches, rows, store, keys, kept)
    clock.report()


def _cell_keys(spec: JobSpec, store: reuse.Store | None) -> dict[str, str]:
    """The inputs key of every cell of the job (none without a store)."""
    if store is None:
        return {}
    return {item.unit(s): store.cell_key(item, s) for item in spec.items for s in item.sources}


def _write_load_record(
    item: ItemSpec, launches: int, rows: dict[str, CellRows], store, keys: dict, kept: dict
) -> None:
    """The item's record from its cells' ``rows``; the stored text instead when every cell
    was kept. New cells go into the store."""
    record_key = store and store.record_key(item, [keys[unit] for unit in rows])
    if store and set(rows) <= set(kept) and (text := store.load_record(record_key)):
        write_text(item.record, text)
        return
    write_json(item.record, load_record_of(item, list(rows.values()), launches).to_dict())
    if store:
        for unit in set(rows) - set(kept):
            store.keep_cell(keys[unit], rows[unit])
        store.keep_load_record(record_key, item)


def _read_sources(spec: JobSpec) -> tuple[dict[str, SaveRecord], dict[str, LoadResult], JobSpec]:
    """(save record of every cell, result of every cell that is not to run, the job with only
    the cells to run). A cell runs when its save job succeeded, wrote its checkpoint where the
    spec says and the item is not skipped."""
    saves, results, to_run = {}, {}, set()
    for item in spec.items:
        for source in item.sources:
            unit = item.unit(source)
            try:
                save = saves[unit] = read_saved(source)
            except UnreadableRecord as error:
                saves[unit] = error.stand_in(item.model, source)
                results[unit] = LoadResult(status="error", reason=str(error))
                continue
            if save.status != "ok" and source.naming is not None:
                results[unit] = LoadResult(status="error", reason=f"import: {save.reason}")
            elif save.status != "ok":
                results[unit] = LoadResult(status="not_run", reason="the save job failed")
            elif moved := _moved(source, save):
                results[unit] = LoadResult(status="error", reason=moved)
            elif item.skip:
                results[unit] = LoadResult(status="skip", reason=item.skip)
            else:
                to_run.add(unit)
    return saves, results, spec.narrowed(to_run)


class UnreadableRecord(Exception):
    """A save or import record that cannot be read (edited, truncated, of another form): its
    cells are errors naming the file; the job's other cells go on."""

    def __init__(self, path: str, error: Exception):
        why = " ".join(f"{type(error).__name__}: {error}".split())
        super().__init__(f"the record {path} cannot be read ({why})")

    def stand_in(self, model: str, source: Source) -> SaveRecord:
        """The record the cell's row takes its save-side columns from."""
        where = {"checkpoint": source.paths.checkpoint, "reference": source.paths.reference}
        return SaveRecord(
            status="error", reason=str(self), model=model, layout=source.layout, **where,
            config_hash="", created_at="", torch_version="",
        )  # fmt: skip


def read_saved(source: Source) -> SaveRecord:
    """The record a cell of ``source`` reads: its save record, or an existing checkpoint's
    import record (ImportRecord)."""
    typed = SaveRecord if source.naming is None else ImportRecord
    try:
        return typed.from_dict(read_json(source.save_record))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise UnreadableRecord(source.save_record, error) from error


def _moved(source: Source, save: SaveRecord) -> str | None:
    """Why a save record names other folders than the spec (grid.source), or None."""
    for key in ("checkpoint", "reference"):
        expected, named = getattr(source.paths, key), getattr(save, key)
        if named != expected:
            return (
                f"the save record {source.save_record} names another {key} "
                f"({named!r}, expected {expected!r})"
            )
    return None


def cell_rows(
    item: ItemSpec, source: Source, saves: dict[str, SaveRecord], results: dict[str, LoadResult]
) -> CellRows:
    """The matrix row (with its verdict) and tensor rows of one cell, from its save record and
    load result."""
    from pipeline_lib.verify.records import cell_row, tensor_rows

    unit, torch = item.unit(source), torch_version()
    return CellRows(
        cell=cell_row(item.model, saves[unit], results[unit], item, torch),
        tensors=tensor_rows(item.model, saves[unit], results[unit], item, torch),
    )


def load_record_of(item: ItemSpec, rows: list[CellRows], launches: int) -> LoadRecord:
    """The record of one load item: its cells' matrix rows and tensor rows (cell_rows)."""
    return LoadRecord(
        cells=[r.cell for r in rows],
        tensors=[t for r in rows for t in r.tensors],
        launches=launches,
        fault=item.fault_tag,
    )
