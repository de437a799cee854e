"""The per-rank program of a save or load job, started by torchrun (see launcher.py).

Usage: python -m pipeline_lib.job.worker SPEC.json. The process group and device mesh are made once;
then the job's items (variant, model) run one after the other. Rank 0 writes progress marks (the
launcher's watchdog reads them; ``unit`` names the save item or load cell in progress) and one
result file per unit (``results/<unit>.json``, read by the job's driver). Everything a rank does is
in step with the other ranks: every collective runs on all ranks in one order. A save item and a
load cell read as lists of phases (``Job.phase``): the model and training are
pipeline_lib.job.training, the checks pipeline_lib.verify.checks, the faults' hooks
pipeline_lib.verify.faults."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import resource
import sys
import time
from dataclasses import astuple, dataclass, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.elastic.multiprocessing.errors import record

from pipeline_lib import frameworks
from pipeline_lib.common import timestamps
from pipeline_lib.common.atomic import read_json, write_json
from pipeline_lib.common.errors import Incompatible, log_traceback, one_line, whole_line
from pipeline_lib.common.layout import Layout
from pipeline_lib.job import (
    checkpoint_io,
    existing,
    hf_export,
    launcher,
    sequence_saver,
    sequence_steps,
    training,
)
from pipeline_lib.job.pipelining import PipelineSettings, stages_agree
from pipeline_lib.job.training import LOADER_SEED_OFFSET, Item, Placement, Trainee
from pipeline_lib.plan.axes import layout_conflict
from pipeline_lib.plan.specs import JobSpec, Source
from pipeline_lib.verify import checks, faults, seal_file, sealed_mode
from pipeline_lib.verify.bitwise import shared_storage
from pipeline_lib.verify.entries import entry_table, flatten_with_empty
from pipeline_lib.verify.hf_folder import FORMAT as HF_FOLDER
from pipeline_lib.verify.reference import Reference, load_form_dir
from pipeline_lib.verify.results import Env, LoadResult, SaveResult, Timing, result_type


class Job:
    """This rank's part of one torchrun launch: process group, device mesh, progress marks and
    result files."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.work = Path(spec.work_dir)
        device_type, backend = _device_and_backend(spec.run)
        device = torch.device("cpu")
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            device = torch.device("cuda", torch.cuda.current_device())
        # A rank stuck in a collective gives up after the step timeout (the parent kills sooner).
        dist.init_process_group(backend, timeout=timedelta(seconds=spec.run["cell_timeout_s"] * 2))
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.placement = _placement(spec.layout, device_type, device)
        self.env = Env(
            torch_version=torch.__version__,
            python_version=platform.python_version(),
            backend=backend,
            device=device_type,
            hostname=platform.node(),
            threads_per_rank=torch.get_num_threads(),
            rank_start="forkserver" if os.environ.get(launcher.SERVED_ENV) else "exec",
        )

    def progress(self, step: str, unit: str) -> None:
        if self.rank == 0:
            write_json(self.work / "progress.json", {"step": step, "unit": unit, "at": time.time()})

    @contextlib.contextmanager
    def phase(self, step: str, unit: str, timing: Timing | None = None, key: str = ""):
        """One phase of a unit: rank 0's progress mark (the watchdog's), then ``timing.<key>``
        = its seconds (when given)."""
        self.progress(step, unit)
        with timed(timing, key):
            yield

    def write_result(self, name: str, result: SaveResult | LoadResult) -> None:
        if self.rank == 0:
            write_json(self.work / "results" / f"{name}.json", result.to_dict())

    def inject(self, phase: str, fault: str | None) -> None:
        faults.inject(phase, fault, self.rank, self.world_size)

    def peak_rss_mb(self) -> float:
        peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        return round(float(peak), 1)

    def convert_then_break(self, item: Item) -> FilesAccount:
        """Rank 0, once the checkpoint is written: the offline conversion of the variant's
        format, then the item's checkpoint fault, before any check reads the files. Every rank
        gets rank 0's account (the other ranks wait in the broadcast)."""
        account = FilesAccount()
        if self.rank == 0:
            account = _convert_then_break(item.variant, item.spec.paths, item.spec.fault)
        shared = [astuple(account)]  # plain values: this module may run as __main__
        dist.broadcast_object_list(shared, src=0)
        return FilesAccount(*shared[0])


@dataclass(frozen=True)
class FilesAccount:
    """What happened to the files between the save and check 1 (rank 0's account): the
    offline conversion's seconds, what the campaign's checkpoint fault changed, or why either
    failed."""

    convert_s: float = 0.0
    fault_applied: str | None = None
    error: str = ""


def _convert_then_break(variant, paths, fault: str | None) -> FilesAccount:
    started = time.perf_counter()
    try:
        checkpoint_io.convert(variant, paths)
    except Exception as exc:
        return FilesAccount(error=f"conversion: {one_line(exc)}")
    convert_s = time.perf_counter() - started
    try:
        applied = faults.apply_to_checkpoint(fault, Path(paths.checkpoint))
    except Exception as exc:
        return FilesAccount(convert_s, error=f"checkpoint fault {fault}: {one_line(exc)}")
    return FilesAccount(convert_s, applied)


@contextlib.contextmanager
def timed(timing: Timing | None, key: str):
    """``timing.<key>`` = the seconds the block took (nothing when ``timing`` is None)."""
    started = time.perf_counter()
    yield
    if timing is not None:
        setattr(timing, key, time.perf_counter() - started)


def _device_and_backend(run: dict) -> tuple[str, str]:
    device = run["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = run["backend"]
    if backend == "auto":
        backend = "nccl" if device == "cuda" else "gloo"
    return device, backend


def _placement(layout: Layout, device_type: str, device: torch.device) -> Placement:
    framework = frameworks.get(layout.framework)
    mesh = init_device_mesh(device_type, layout.mesh, mesh_dim_names=layout.mesh_dims)
    dp_rank, dp_size = 0, 1
    for dim in framework.data_parallel_dims:
        dp_rank = dp_rank * mesh[dim].size() + mesh.get_local_rank(dim)
        dp_size *= mesh[dim].size()
    tp_degree = mesh[layout.tp_dim].size() if layout.tp_dim else 1
    pipeline = None
    if framework.pp_dim:
        pipeline = PipelineSettings.of(layout, mesh, framework.pp_dim)
    return Placement(device, framework, mesh, dp_rank, dp_size, tp_degree, pipeline)


def run_save(job: Job, item: Item, startup_s: float) -> None:
    """One save item: build, train, the saver's reference, check 0, save, resume, check 1."""
    if item.variant.saves_sequence:  # more than one save: pipeline_lib.job.sequence_saver
        steps = sequence_saver.SaverSteps(write_reference, saved_state, save_result)
        return sequence_saver.run(job, item, startup_s, steps)
    paths, settings, variant, fault = item.spec.paths, item.train, item.variant, item.spec.fault
    at, unit, timing = job.placement, item.id, Timing(startup_s=startup_s)
    if variant.exports_hf:
        hf_export.refuse_unless_hf(item)
    with job.phase("build", unit, timing, "build_s"):
        trainee = training.build(item, at, settings["seed"], fault=fault)
    with job.phase("train", unit, timing, "train_s"):
        train_losses = training.train(item, at, trainee, 0, settings["steps"])
    with job.phase("reference", unit, timing, "reference_s"):
        dropped = training.dropped_entries(item, trainee)
        added = training.added_entries(item)
        live, live_shared = write_reference(item, at, trainee, (dropped, added), job.rank)
    with job.phase("state dict", unit, timing, "state_check_s"):
        state, flat, state_check = saved_state(item, trainee, (dropped, added), live_shared)
    with job.phase("save", unit):
        job.inject("save", fault)
        faults.keep_rank0_adapter_shard(fault, state, trainee.model, variant.writes_full_state)
        wait = checkpoint_io.write(variant, state, paths, timing)
    export = None
    if variant.exports_hf:
        with job.phase("hf export", unit, timing, "hf_export_s"):
            export = hf_export.run(item, trainee, getattr(torch, variant.param_dtype))
    sealed = None
    if seal_file.is_sealed(item.spec.verify):
        wait()  # check 1 reads what the save wrote before the resume changes the live state
        sealed = check_and_seal(job, item, live, timing)
    with job.phase("resume", unit, timing, "resume_s"):
        # An async save is still writing while the training loop goes on.
        resume_losses = training.train(
            item, at, trainee, settings["steps"], settings["resume_steps"]
        )
    wait()
    files, files_check, files_error = sealed or check_files(job, item, timing)
    if files.error:
        job.write_result(unit, SaveResult(status="error", reason=files.error))
        return
    timing.convert_s = files.convert_s
    facts = SaveResult(
        status="ok", reason="", state_check=state_check, files_check=files_check,
        files_error=files_error, hf_export=export, fault_applied=files.fault_applied,
        train_losses=train_losses, resume_losses=resume_losses,
        loss_source=training.loss_source(trainee), timing=timing,
    )  # fmt: skip
    changed = (dropped, sorted(f"model.{k}" for k in added))
    job.write_result(unit, save_result(job, trainee, flat, changed, facts))
    with job.phase("reload", unit):
        reload_in_saver(job, item, trainee)


def check_files(job: Job, item: Item, timing: Timing) -> tuple[FilesAccount, dict, str]:
    """Once the save completed: the conversion and checkpoint fault (``convert_then_break``),
    then check 1 of the files against the saver's reference. (account, check 1, reason the
    files cannot be read)."""
    with job.phase("files check", item.id):
        files = job.convert_then_break(item)
    if files.error:
        return files, {}, ""
    with job.phase("files check", item.id, timing, "files_check_s"):
        return (files, *checks.files_vs_saver(item))


def check_and_seal(
    job: Job, item: Item, live: dict, timing: Timing
) -> tuple[FilesAccount, dict, str]:
    """Sealed mode, before the resume changes the live state: the conversion and checkpoint
    fault (``convert_then_break``), check 1 of the files against the live state, then the seal
    (and a sealed fault after it). (account, check 1, reason the files cannot be read)."""
    paths, variant, unit = item.spec.paths, item.variant, item.id
    with job.phase("files check", unit):
        files = job.convert_then_break(item)
    if files.error:
        return files, {}, ""
    with job.phase("files check", unit, timing, "files_check_s"):
        files_check, files_error = sealed_mode.files_vs_live(variant, paths, live)
    with job.phase("seal", unit, timing, "seal_s"):
        sealed_mode.write_seal(paths.read_by(variant))
    if job.rank == 0 and (
        broken := faults.apply_after_seal(item.spec.fault, Path(paths.read_by(variant)))
    ):
        files = replace(files, fault_applied=broken)
    return files, files_check, files_error


def saved_state(item: Item, trainee: Trainee, changed, live_shared) -> tuple[dict, dict, dict]:
    """(the state the saver writes, flattened, check 0 on it): get_state_dict's state in the
    variant's format, less the entry a strict mode drops and with the one it adds."""
    variant, fault, (dropped, added) = item.variant, item.spec.fault, changed
    state = training.state_dict(item, trainee, full=variant.writes_full_state, fault=fault)
    state = checkpoint_io.part_in_format(variant, state)
    for name in dropped:
        del state["model"][name.removeprefix("model.")]
    state["model"].update(added)
    flat = flatten_with_empty(checkpoint_io.stateful_as_dicts(state))
    if seal_file.is_sealed(item.spec.verify):  # no reference: values are check 1's (files vs live)
        shared = shared_storage(flat, trainee.anatomy.canonical)
        return state, flat, sealed_mode.sharing_only(live_shared, shared)
    dist.barrier()  # every rank's part of the reference is written
    state_check = checks.against_reference(
        flat, item.spec.paths.reference, "the saver's state dict", trainee.anatomy,
        shared=live_shared, stage=trainee.pipeline is not None,
    )  # fmt: skip
    return state, flat, state_check


def save_result(job: Job, t: Trainee, flat: dict, changed, facts: SaveResult) -> SaveResult:
    """A save item's result (rank 0's; the driver makes it the save record): ``facts``, its
    checks, losses and timing, with what every save item reports besides."""
    return replace(
        facts,
        entries=entry_table(flat, t.param_names) if job.rank == 0 else {},
        # The entries the saver left out and added on purpose.
        dropped_entries=changed[0],
        added_entries=changed[1],
        # ignore_frozen_params: none of these may be in the state the saver wrote.
        frozen_saved=sorted(
            n for n in flat if t.ignores_frozen and n.removeprefix("model.") in t.frozen
        ),
        peak_rss_mb=job.peak_rss_mb(),
        env=job.env,
    )


def write_reference(item: Item, at: Placement, t: Trainee, changed: tuple, rank: int):
    """The saver's reference: its live objects, read before the state-dict API runs (nothing
    that API does to them reaches the reference); every rank writes its own parts. ``changed``:
    the entries the saver leaves out and adds on purpose. A load_mode that names entries
    otherwise gets them in its form too (``load_form_dir``). Returns the live state (flat) and
    its own entries that share storage (a model or optimizer bug), as notes. Sealed mode writes
    no reference: check 1 compares the files with the live state itself."""
    dropped, added = changed
    live = training.live(item, at, t, dropped)
    live.update({f"model.{key}": value for key, value in added.items()})
    shared = shared_storage(live, t.anatomy.canonical)
    notes = {name: f"live: {note}" for name, note in shared.items()}
    if seal_file.is_sealed(item.spec.verify):
        return live, notes
    Reference.write(item.spec.paths.reference, live, rank)
    if item.variant.forms_differ:
        form = training.live(item, at, t, dropped, side="load")
        Reference.write(load_form_dir(item.spec.paths.reference), form, rank, beside=live)
    return live, notes


def reload_in_saver(job: Job, item: Item, trainee: Trainee) -> None:
    """load_process saver: the saver's process loads its checkpoint right after the save into
    its own model and optimizer (trained ``resume_steps`` on since), checks it and resumes, as
    a fresh loader does; rank 0 writes the cell's result beside the checkpoint for the load job
    of this layout to take (``saver_reload``)."""
    variant = item.variant
    if variant.load_process != "saver" or layout_conflict(
        variant, "load", job.world_size, job.spec.layout.framework
    ):
        return
    paths, fault = item.spec.paths, item.spec.fault
    source = Source(id=item.id, layout=item.spec.layout, paths=paths, save_record="", fault=fault)
    timing = Timing()
    try:
        with timed(timing, "build_s"):
            state = training.state_dict(item, trainee, fault=fault, side="load")
        result = load_into(job, item, trainee, state, source, timing)
    except (Exception, CheckpointException) as exc:
        log_traceback(f"reload of {item.id} in the saver", exc)
        result = LoadResult(status="error", reason=f"reload in the saver: {one_line(exc)}")
    if job.rank == 0:
        write_json(saver_reload_path(paths.reference), result.to_dict())


def saver_reload_path(reference: str) -> str:
    """Where the saver's process writes the result of its own reload (load_process saver)."""
    return f"{os.path.dirname(reference)}/saver_reload.json"


def saver_reload(job: Job, source: Source) -> LoadResult:
    """The cell of load_process saver: the result the saver's process wrote, for the cell of its
    own layout; any other load layout is ``skip``."""
    if source.layout.name != job.spec.layout.name:
        reason = "load_process saver: the saver's own process loads under its own layout only"
        return LoadResult(status="skip", reason=reason)
    return LoadResult.from_dict(read_json(saver_reload_path(source.paths.reference)))


def load_one(job: Job, item: Item, source: Source) -> LoadResult:
    """One load cell: build with another init, load, check 2, resume (load_process saver: the
    saver's process did so, ``saver_reload``)."""
    if item.variant.load_process == "saver":
        return saver_reload(job, source)
    item = sequence_steps.as_loaded(item)  # save_sequence: resume from the loaded checkpoint's step
    places = None
    if source.naming is not None:  # an existing checkpoint: its optimizer entries decide
        spec = item.spec
        find = existing.hf_placement if source.format == HF_FOLDER else existing.placement
        places = find(source.paths.checkpoint, source.naming, spec.model, spec.model_kwargs)
        item = item.in_mode("flattened_optim" if places.flattened_optim else "sharded")
    settings, fault, variant, at = item.train, source.fault, item.variant, job.placement
    timing = Timing()
    with timed(timing, "build_s"):
        seed, meta = settings["seed"] + LOADER_SEED_OFFSET, variant.load_init == "meta"
        base_seed = training.base_seed(item)
        trainee = training.build(
            item, at, seed, meta=meta, fault=fault, base_seed=base_seed, loader=True
        )
        state = training.state_dict(item, trainee, fault=fault, side="load")
    return load_into(job, item, trainee, state, source, timing, places)


def load_into(
    job: Job,
    item: Item,
    trainee: Trainee,
    state: dict,
    source: Source,
    timing: Timing,
    places=None,
) -> LoadResult:
    """Load ``source`` into ``trainee`` (``state``: its state dict in the loader's mode; an
    existing checkpoint's under its ``places``), check 2, resume; the cell's result (``timing``
    gets load_s, verify_s, resume_s)."""
    settings, fault, variant, at = item.train, source.fault, item.variant, job.placement
    sealed = sealed_mode.sealed_source(item, source)
    if sealed:
        with timed(timing, "seal_s"):
            broken = sealed_mode.check_seal(source.paths.read_by(variant))
        if broken:
            return LoadResult(
                status="ok", reason="", seal_ok=False, seal_error=broken, timing=timing
            )
    with timed(timing, "load_s"):
        report, strict_error = read_source(job, item, trainee, state, source, places)
        faults.change_extra_state(fault, trainee.model)
    if strict_error is not None:
        return LoadResult(
            status="ok", reason="", strict_error=strict_error, timing=timing, seal_ok=sealed or None
        )
    faults.break_loaded_optim_state(fault, trainee.optimizer)
    model_only = places is not None and places.model_only
    with timed(timing, "verify_s"):
        through_api, from_live = training.loaded_state(item, at, trainee, fault)
        entries = checks.loader_vs_saver(
            item, through_api, from_live, trainee.anatomy, source, report,
            sealed=sealed, stage=at.pipeline is not None, model_only=model_only,
        )  # fmt: skip
    if model_only:  # weights only: the resume starts with a new optimizer, as fine-tuning does
        existing.fresh_optimizer(item, trainee)
    try:
        with timed(timing, "resume_s"):
            faults.skew_resume(fault, trainee.optimizer)
            resume = training.train(item, at, trainee, settings["steps"], settings["resume_steps"])
    except (Exception, CheckpointException) as exc:  # check 2's findings stay in the record
        log_traceback(f"resume of cell {source.id}", exc)
        reason = f"resume: {one_line(exc)}"
        return LoadResult(status="error", reason=reason, entries=entries, timing=timing)
    return LoadResult(
        status="ok",
        reason="",
        entries=entries,
        missing_entries=report.missing,
        unexpected_entries=report.unexpected,
        uncompared_entries=report.uncompared or None,
        resume_losses=resume,
        resume_optimizer="fresh" if model_only else "loaded",
        timing=timing,
        seal_ok=sealed or None,
    )


def read_source(
    job: Job, item: Item, trainee: Trainee, state: dict, source: Source, places
) -> tuple[checkpoint_io.LoadReport, str | None]:
    """The load of ``source`` into ``trainee`` the variant's way (an existing checkpoint's
    under its ``places``): (the non-strict load's account, None), or (an empty account, the
    error of a strict load that failed as its mode expects)."""
    variant, fault = item.variant, source.fault
    job.inject("load", fault)
    try:
        if fault == "skip_load":
            return checkpoint_io.LoadReport(), None
        if places is not None:
            opts = checkpoint_io.options(variant, bool(trainee.frozen), False, side="load")
            load = existing.load_hf_folder if source.format == HF_FOLDER else existing.load
            load(trainee, state, source.paths.checkpoint, places, opts)
            return checkpoint_io.LoadReport(uncompared=existing.uncompared(source, state)), None
        with stages_agree(job.placement.pipeline is not None):
            return checkpoint_io.read(variant, trainee, state, source.paths, fault), None
    except (CheckpointException, RuntimeError) as exc:
        if not _expected_failure(variant, exc):
            raise
        # The expected outcome of a strict load of a checkpoint with an entry left out
        # (dcp.load's CheckpointException) or added (set_state_dict's RuntimeError).
        error = one_line(exc) if isinstance(exc, CheckpointException) else whole_line(exc)
        return checkpoint_io.LoadReport(), error


def _expected_failure(variant, exc: BaseException) -> bool:
    """A strict load's failure its mode expects: dcp.load's CheckpointException (mode strict:
    an entry left out), set_state_dict's RuntimeError (strict_unexpected: an entry added)."""
    if variant.mode == "strict":
        return isinstance(exc, CheckpointException)
    return variant.mode == "strict_unexpected" and not isinstance(exc, CheckpointException)


def run_load(job: Job, item: Item, startup_s: float) -> None:
    for source in item.spec.sources:
        unit = item.spec.unit(source)
        job.progress(f"cell {source.id}", unit)
        try:
            result = load_one(job, item, source)
        except Incompatible:
            raise
        except (Exception, CheckpointException) as exc:
            log_traceback(f"cell {source.id}", exc)
            # Written down before any collective: raised on this rank alone, the others may
            # wait for it (launcher.RAISED_DIR).
            launcher.mark_raised(job.work, job.rank, unit, f"cell {source.id}", one_line(exc))
            result = LoadResult(status="error", reason=one_line(exc))
        timing = replace(result.timing or Timing(), startup_s=startup_s)
        job.write_result(unit, replace(
            result, timing=timing, peak_rss_mb=job.peak_rss_mb(), env=job.env,
            created_at=timestamps.now(),
        ))  # fmt: skip


def run_item(job: Job, item: Item, startup_s: float) -> None:
    """One item; a model the layout cannot hold makes every unit of the item ``skip``."""
    try:
        (run_save if job.spec.kind == "save" else run_load)(job, item, startup_s)
    except Incompatible as exc:
        units = [item.spec.unit()]
        if job.spec.kind == "load":
            units = [item.spec.unit(source) for source in item.spec.sources]
        for unit in units:
            job.write_result(unit, result_type(job.spec.kind)(status="skip", reason=str(exc)))


@record
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    spec = JobSpec.from_dict(read_json(argv[0]))
    job = Job(spec)
    startup_s = time.time() - spec.launched_at
    try:
        for item in spec.items:
            run_item(job, Item.of(item), startup_s)
    except (Exception, CheckpointException) as exc:
        job.write_result("job", result_type(spec.kind)(status="error", reason=one_line(exc)))
        launcher.mark_ended(job.work, job.rank, "error", one_line(exc))
        raise
    else:
        # Every result written: from here on, a rank that does not exit (torch can hang in a
        # process group's destructor: docs/torch-notes.md) is killed by the launcher, and
        # the job's outcome stays what the results say.
        launcher.mark_ended(job.work, job.rank, "ok")
    finally:
        # Free what the items left in reference cycles (a load job's DDP module, say) while
        # the process group lives: a DDP module freed after destroy_process_group can hang
        # its rank for ever (docs/torch-notes.md).
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
