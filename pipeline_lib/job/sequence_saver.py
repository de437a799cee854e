"""The save item of a save sequence (axis ``save_sequence``; the pure parts and the design in
pipeline_lib.job.sequence_steps): build, train, then at each step of the sequence the saver's
reference at that step, check 0 and a save with the one checkpointer object of the run, training on
between the saves; after the last, the resume, then check 1 of every checkpoint against the
reference of its own step and the consecutive-checkpoints check. Imports torch; every function runs
on all ranks, collectives in the same order everywhere."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException

from pipeline_lib.common.errors import one_line
from pipeline_lib.job import checkpoint_io, sequence_steps, training
from pipeline_lib.job.training import Item, Trainee
from pipeline_lib.verify import checks, faults
from pipeline_lib.verify.bitwise import compare
from pipeline_lib.verify.readers import checkpoint_entries
from pipeline_lib.verify.reference import Reference
from pipeline_lib.verify.results import CheckResult, SaveResult, Timing


@dataclass(frozen=True)
class SaverSteps:
    """The steps of a save item that pipeline_lib.job.worker owns (handed in: this module does not
    import the worker, which runs as ``__main__``)."""

    write_reference: Callable
    saved_state: Callable
    save_result: Callable


class Checkpointer:
    """One checkpointer object for every save of a sequence, as a trainer keeps one: one
    FileSystemWriter (DCP resets it to each save's folder), and for dcp.async_save of the
    variant's type one process group and one DefaultStager (which keeps its staging buffers
    from save to save). A save waits for the previous one to complete first, as torchtitan
    does. The faults stale_save and future_save break it on purpose (pipeline_lib.verify.faults)."""

    def __init__(self, variant, fault: str | None, first: str):
        """``first``: the folder of the first save (the writer is made for it)."""
        self.variant, self.fault = variant, fault
        self.writer = dcp.FileSystemWriter(first)
        self.group = self.stager = None
        if variant.async_save != "sync":
            self.group = dist.new_group(backend="gloo")
            self.stager = checkpoint_io.stager(variant)
        self.first: dict | None = None  # stale_save: the state of the first save
        self.hold_next = faults.future_save(fault)  # future_save: hold the first save ...
        self.held: tuple | None = None  # ... past the next optimizer step
        self.pending: Callable[[], None] = lambda: None

    def save(self, state: dict, paths, timing: Timing) -> None:
        self.pending()
        if faults.stale_save(self.fault):
            if self.first is None:
                self.first = copy.deepcopy(checkpoint_io.stateful_as_dicts(state))
            else:
                state = self.first
        if self.hold_next:
            self.hold_next, self.held = False, (state, paths, timing)  # the live tensors
            return
        self.pending = checkpoint_io.write(self.variant, state, paths, timing, keeper=self)

    def after_update(self) -> None:
        """The training loop made one optimizer step since the last save."""
        if self.held is not None:
            (state, paths, timing), self.held = self.held, None
            self.pending = checkpoint_io.write(self.variant, state, paths, timing, keeper=self)

    def close(self) -> None:
        self.pending()
        if self.stager is not None:
            self.stager.close()


def run(job, item: Item, startup_s: float, steps: SaverSteps) -> None:
    """One save item of a sequence (``job``: the worker's Job)."""
    unit, timing = item.id, Timing(startup_s=startup_s)
    folders = sequence_steps.paths_by_step(item.variant, item.spec.paths, item.train)
    by_step = {step: sequence_steps.with_paths(item, paths) for step, paths in folders.items()}
    loaded = sequence_steps.loaded_step(item.variant, item.train)
    trainee, losses, saved = _train_and_save(job, item, by_step, steps, timing)
    with job.phase("files check", unit):
        files = job.convert_then_break(by_step[loaded])
    if files.error:
        job.write_result(unit, SaveResult(status="error", reason=files.error))
        return
    with job.phase("files check", unit, timing, "files_check_s"):
        checked = {step: checks.files_vs_saver(by_step[step]) for step in by_step}
        pairs = list(itertools.pairwise(by_step))
        consecutive = [_consecutive(by_step[a], by_step[b], (a, b)) for a, b in pairs]
    flat, state_check, save_timing = saved[loaded]
    timing.add(save_timing)
    timing.convert_s = files.convert_s
    others = [step for step in by_step if step != loaded]
    facts = SaveResult(
        status="ok", reason="", state_check=state_check, files_check=checked[loaded][0],
        files_error=checked[loaded][1], fault_applied=files.fault_applied, **losses[loaded],
        timing=timing, save_step=loaded, save_steps=list(by_step),
        sequence=_other_checks(saved, checked, others) + consecutive,
    )  # fmt: skip
    job.write_result(unit, steps.save_result(job, trainee, flat, ([], []), facts))


def _train_and_save(job, item: Item, by_step: dict, steps: SaverSteps, timing: Timing):
    """Build, train, and at each step of ``by_step`` (step -> the item at that step's folders)
    the reference, check 0 and a save with the one checkpointer, training on between the saves
    and after the last. (trainee, the losses as the cells of each step see them: {step:
    {train_losses, resume_losses, loss_source}}, {step: (saved state flattened, check 0, save
    timing)})."""
    settings, unit, at, points = item.train, item.id, job.placement, list(by_step)
    with job.phase("build", unit, timing, "build_s"):
        trainee = training.build(item, at, settings["seed"], fault=item.spec.fault)
    with job.phase("train", unit, timing, "train_s"):
        before = training.train(item, at, trainee, 0, points[0])
    keeper = Checkpointer(item.variant, item.spec.fault, by_step[points[0]].spec.paths.checkpoint)
    saved, losses = {}, {}
    for step, after in itertools.pairwise([*points, None]):
        saved[step] = _save_at(job, by_step[step], trainee, keeper, steps)
        phase = ("train", unit) if after is not None else ("resume", unit, timing, "resume_s")
        with job.phase(*phase):
            resumed = _train_on(item, trainee, job, keeper, step)
        source = training.loss_source(trainee)
        losses[step] = {"train_losses": before, "resume_losses": resumed, "loss_source": source}
        before = before + resumed
    with job.phase("save", unit):
        keeper.close()
    return trainee, losses, saved


def _train_on(item: Item, trainee: Trainee, job, keeper: Checkpointer, start: int) -> list[float]:
    """``resume_steps`` steps from ``start`` (a save's step); the checkpointer hears of the
    first optimizer step (future_save writes then)."""
    count, at = item.train["resume_steps"], job.placement
    losses = training.train(item, at, trainee, start, 1)
    keeper.after_update()
    return losses + training.train(item, at, trainee, start + 1, count - 1)


def _save_at(job, item: Item, trainee: Trainee, keeper: Checkpointer, steps: SaverSteps):
    """The saver's reference at this step (``item``'s paths), check 0, the save; (the saved
    state flattened, check 0, the save's timing)."""
    unit, timing = item.id, Timing()
    with job.phase("reference", unit):
        _, live_shared = steps.write_reference(item, job.placement, trainee, ([], {}), job.rank)
    with job.phase("state dict", unit):
        state, flat, state_check = steps.saved_state(item, trainee, ([], {}), live_shared)
    with job.phase("save", unit):
        job.inject("save", item.spec.fault)
        keeper.save(state, item.spec.paths, timing)
    return flat, state_check, timing


def _other_checks(saved: dict, checked: dict, others: list[int]) -> list[CheckResult]:
    """Checks 0 and 1 of the checkpoints the cells do not load, named with their step."""
    found = []
    for step in others:
        state = sequence_steps.check_at("state dict vs live", step)
        found.append(sequence_steps.sequence_check(state, saved[step][1]))
        files = sequence_steps.check_at("files vs saver", step)
        found.append(sequence_steps.sequence_check(files, *checked[step]))
    return found


def _consecutive(earlier: Item, later: Item, steps: tuple[int, int]) -> CheckResult | None:
    """The consecutive-checkpoints check of two checkpoints of the sequence: every rank reads a
    share of the later checkpoint's entries and the same entries of the earlier one (no process
    group), and compares the two with each other and the saver's references of the two steps
    with each other. Rank 0 gets the check (sequence_steps.unchanged; None on the other ranks)."""
    refs = [Reference(i.spec.paths.reference) for i in (earlier, later)]
    share = (dist.get_rank(), dist.get_world_size())
    changed, same, error = {}, {}, ""
    try:
        then = dict(checkpoint_entries(later.spec.paths.checkpoint, False, share))
        names = [n for n, v in then.items() if not isinstance(v, BaseException)]
        names = [n for n in names if n in refs[0] and n in refs[1]]
        first = _read(earlier.spec.paths.checkpoint, names)
        for name in (n for n in names if n in first):
            changed[name] = not compare(refs[0].whole(name), refs[1].whole(name)).equal
            same[name] = compare(first[name], then[name]).equal
    except (Exception, CheckpointException) as exc:
        error = f"{sequence_steps.CONSECUTIVE}: cannot read the checkpoints of steps {steps}: "
        error += one_line(exc)
    every_rank = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object((changed, same, error), every_rank, dst=0)
    if every_rank is None:
        return None
    errors = [e for _, _, e in every_rank if e]
    changed = {n: c for part, _, _ in every_rank for n, c in part.items()}
    same = {n: s for _, part, _ in every_rank for n, s in part.items()}
    entries = sequence_steps.unchanged(changed, same, steps)
    return sequence_steps.sequence_check(
        sequence_steps.CONSECUTIVE, entries, errors[0] if errors else ""
    )


def _read(path: str, names: list[str]) -> dict:
    """The entries ``names`` of a DCP checkpoint, read in this process (no process group);
    those it lacks are left out."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from pipeline_lib.verify.untrusted import SafeFileSystemReader, SafeLoadPlanner

    reader = SafeFileSystemReader(path)
    metadata = reader.read_metadata().state_dict_metadata
    holder = {}
    for name in (n for n in names if n in metadata):
        meta = metadata[name]
        tensor = isinstance(meta, TensorStorageMetadata)
        holder[name] = torch.empty(meta.size, dtype=meta.properties.dtype) if tensor else None
    if holder:
        dcp.load(holder, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
    return holder
