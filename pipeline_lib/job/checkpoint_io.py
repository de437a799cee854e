"""Write and read a job's state the way a variant says (pipeline_lib.plan.axes): state-dict options,
sharded DCP or a full state dict on rank 0, the storage format, sync or async save. Imports torch.

Every function here runs on all ranks of a job; collectives happen in the same order everywhere.
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions

from pipeline_lib.common.errors import Incompatible, one_line
from pipeline_lib.plan.axes import Variant
from pipeline_lib.plan.specs import CheckpointPaths
from pipeline_lib.verify import faults
from pipeline_lib.verify.results import Timing
from pipeline_lib.verify.untrusted import SafeLoadPlanner


def options(variant: Variant, frozen: bool, full: bool, side: str = "save") -> StateDictOptions:
    """The state-dict options of a variant on one side ("save" or "load"); ``frozen``: the model
    has frozen parameters; ``full``: the full state dict on rank 0 (CPU). Modes full_dcp and
    full_dcp_rank0 make the save side's full too: on every rank, or on rank 0 (cpu_offload)."""
    full_dcp, rank0 = variant.full_dcp(side)
    return StateDictOptions(
        full_state_dict=full or full_dcp,
        cpu_offload=full or rank0,
        ignore_frozen_params=variant.ignores_frozen(frozen),
        flatten_optimizer_state_dict=variant.flattened(side),
    )


def part_in_format(variant: Variant, state: dict) -> dict:
    """The part of ``state`` the variant's format holds (nested dicts shared with ``state``):
    safetensors holds tensors only, so not the optimizer's param_groups."""
    if variant.format.startswith("safetensors"):
        return {"model": state["model"], "optim": {"state": state["optim"]["state"]}}
    return state


def entries_in_format(variant: Variant, flat: dict) -> dict:
    """The entries of a flattened state that the variant's format holds (as ``part_in_format``)."""
    if variant.format.startswith("safetensors"):
        return {n: v for n, v in flat.items() if n.startswith(("model.", "optim.state."))}
    return flat


def _hf_writer(path: str, consolidate: bool):
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    return HuggingFaceStorageWriter(path, save_distributed=True, enable_consolidation=consolidate)


def stager(variant: Variant):
    """The DefaultStager of an async save: every StagingOptions off (what dcp.async_save makes
    when given none) or, for process_pinned, every one on (pinned and shared memory, staging in
    the background, non-blocking copies), which needs CUDA. Its owner closes it."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    if variant.async_save != "process_pinned":
        return DefaultStager(StagingOptions(False, False, False, False))
    if not torch.cuda.is_available():
        raise Incompatible("async_save process_pinned stages into pinned memory: needs CUDA")
    return DefaultStager(StagingOptions(True, True, True, True))


def write(variant: Variant, state: dict, paths: CheckpointPaths, timing: Timing, keeper=None):
    """Write ``state``; returns a wait() to call once the training loop has moved on, which waits
    for an async save to complete. ``timing``: ``save_blocked_s``, the time the training loop was
    blocked, and ``save_s``, until the checkpoint was written. ``keeper``: a save sequence's
    checkpointer (pipeline_lib.job.sequence_saver.Checkpointer), whose storage writer every save of
    the sequence uses, and whose process group and stager every async save."""
    if variant.engine == "torch_checkpointing":
        from pipeline_lib.job import engines

        return engines.write(state, paths, timing)
    t = time.perf_counter()
    pending = owned = None
    if variant.writes_full_state:
        if dist.get_rank() == 0:
            torch.save(stateful_as_dicts(state), paths.full_state)
        dist.barrier()
    elif variant.format.startswith("safetensors"):
        writer = _hf_writer(paths.checkpoint, variant.format == "safetensors_consolidated")
        dcp.save(state, storage_writer=writer)
    elif variant.async_save != "sync":
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        kind = AsyncCheckpointerType[variant.async_save.removesuffix("_pinned").upper()]
        # A process group of its own: the background save's collectives must not interleave
        # with the training loop's on the default group (gloo aborts the process).
        group = keeper.group if keeper else dist.new_group(backend="gloo")
        # A sequence's checkpointer keeps its stager; a single save's is closed after it.
        owned = None if keeper else stager(variant)
        pending = dcp.async_save(
            state,
            checkpoint_id=paths.checkpoint,
            process_group=group,
            async_checkpointer_type=kind,
            async_stager=keeper.stager if keeper else owned,
            storage_writer=keeper.writer if keeper else None,
        )
    else:
        writer = keeper.writer if keeper else None
        dcp.save(state, checkpoint_id=paths.checkpoint, storage_writer=writer)
    timing.save_blocked_s = timing.save_s = time.perf_counter() - t
    if pending is None:
        return lambda: None
    # torch returns a Future, or an AsyncSaveResponse holding one for the upload.
    future = getattr(pending, "upload_completion", pending)
    written = threading.Event()

    def on_written(_) -> None:
        timing.save_s = time.perf_counter() - t
        written.set()

    future.add_done_callback(on_written)

    def wait() -> None:
        future.result()
        written.wait()  # callbacks may run just after result() returns
        if owned is not None:
            owned.close()

    return wait


@dataclass(frozen=True)
class LoadReport:
    """What a non-strict load reported: model entries missing from, and unexpected in, the
    checkpoint (``model.<fqn>``; empty for strict loads)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    # An existing checkpoint's: the loader's entries it has no counterpart for by its writer's
    # design (naming.uncompared), not compared.
    uncompared: list[str] = field(default_factory=list)


def read(variant: Variant, trainee, state: dict, paths: CheckpointPaths, fault=None) -> LoadReport:
    """Load the checkpoint at ``paths`` into the trainee's model and optimizer (and the
    Stateful entries of ``state``, the loader's state dict in its mode), the way the loader's
    mode (``Variant.side_mode("load")``) says, strict unless the mode is a non_strict one."""
    opts = options(variant, bool(trainee.frozen), full=False, side="load")
    if variant.engine == "torch_checkpointing":
        from pipeline_lib.job import engines

        engines.read(trainee, state, paths, opts)
        return LoadReport()
    if variant.loads_full or (variant.reads_full_state and variant.load_mode == "same"):
        _broadcast_full_state(variant, trainee, state, paths, opts)
        return LoadReport()
    if variant.reads_full_state:
        _distribute_full_state(trainee, state, paths, opts)
        return LoadReport()
    if variant.legacy("load"):
        from pipeline_lib.job import legacy_fsdp

        reader = functools.partial(_reader, variant, paths)
        legacy_fsdp.load(trainee.model, trainee.optimizer, state, reader, SafeLoadPlanner)
        return LoadReport()
    return _read_sharded(variant, trainee, state, paths, opts, fault)


def _read_sharded(variant: Variant, trainee, state: dict, paths, opts, fault) -> LoadReport:
    """dcp.load into the loader's sharded state dict, then set_state_dict. A non-strict load
    leaves out what the checkpoint lacks; a mode that adds an entry loads every model entry the
    checkpoint holds (as a user loading a whole checkpoint does: from its metadata)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    strict = variant.strict
    present = {}
    if not strict or variant.adds_entry:
        present = _reader(variant, paths).read_metadata().state_dict_metadata
    if not strict:
        for key in _absent(state["model"], set(present)):
            del state["model"][key]
    if variant.adds_entry and not faults.ignores_unexpected(fault):
        state["model"].update(_unknown(state["model"], present))
    # safetensors holds tensors only (part_in_format); DCP may lack the entry left out.
    partial = not strict and not variant.format.startswith("safetensors")
    reader, planner = _reader(variant, paths), SafeLoadPlanner(allow_partial_load=partial)
    dcp.load(part_in_format(variant, state), storage_reader=reader, planner=planner)
    result = set_state_dict(
        trainee.model,
        trainee.optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        # The state left out frozen parameters: a strict set_state_dict would want them.
        options=replace(opts, strict=strict and not opts.ignore_frozen_params),
    )
    if strict:
        return LoadReport()
    return LoadReport(
        sorted(f"model.{k}" for k in result.missing_keys),
        sorted(f"model.{k}" for k in result.unexpected_keys),
    )


def _absent(model_state: dict, present: set[str]) -> list[str]:
    """Keys of a model state the checkpoint does not hold; a key holding a dict (extra state)
    is held as its flattened parts."""
    return [
        key
        for key in model_state
        if f"model.{key}" not in present and not any(p.startswith(f"model.{key}.") for p in present)
    ]


def _unknown(model_state: dict, present: dict) -> dict:
    """The checkpoint's model tensor entries the model state lacks (neither a key nor a part of
    one), as empty tensors of their size and dtype for dcp.load to fill."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    unknown = {}
    for name, meta in present.items():
        key = name.removeprefix("model.")
        if key == name or not isinstance(meta, TensorStorageMetadata) or key in model_state:
            continue
        if not any(key.startswith(f"{k}.") for k in model_state):
            unknown[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
    return unknown


def _broadcast_full_state(variant: Variant, trainee, state: dict, paths, opts) -> None:
    """A full state dict on rank 0, broadcast into every rank's model and optimizer: the
    torch.save file, or the DCP checkpoint read on rank 0 alone (``_dcp_on_rank0``)."""
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model, optimizer = trainee.model, trainee.optimizer
    if variant.reads_full_state:
        full = torch.load(paths.full_state, weights_only=True) if dist.get_rank() == 0 else {}
    else:
        full = _dcp_on_rank0(variant, trainee, state, paths, opts)
    # A state without the frozen parameters: strict (load_state_dict's) would want them, as in
    # _read_sharded; the broadcast drops the loader's own copies of keys rank 0 lacks.
    strict = not opts.ignore_frozen_params
    broadcast = replace(opts, full_state_dict=True, broadcast_from_rank0=True, strict=strict)
    # Model and optimizer one call each: set_state_dict takes the other ranks' empty model state
    # as "optimizer only" and skips the model broadcast rank 0 joins (a hang, torch 2.13).
    set_model_state_dict(model, full.get("model", {}), options=broadcast)
    set_optimizer_state_dict(model, optimizer, full.get("optim", {}), options=broadcast)
    _load_stateful_from_rank0(state, full)


def _dcp_on_rank0(variant: Variant, trainee, state: dict, paths, opts) -> dict:
    """The DCP checkpoint read by rank 0 alone (``no_dist``) into the loader's full state dict
    (get_state_dict(full_state_dict=True, cpu_offload=True): the entries' shapes, on rank 0;
    {} on the others), and the Stateful entries' state dicts."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    gathered = replace(opts, full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(trainee.model, trainee.optimizer, options=gathered)
    full = {"model": model_state, "optim": optim_state}
    full.update({k: v.state_dict() for k, v in state.items() if k not in full})
    error = None
    if dist.get_rank() == 0:
        reader, planner = _reader(variant, paths), SafeLoadPlanner()
        try:
            dcp.load(full, storage_reader=reader, planner=planner, no_dist=True)
        except (Exception, CheckpointException) as exc:
            error = exc
    _raise_on_every_rank(error)
    return full


def _raise_on_every_rank(error: BaseException | None) -> None:
    """Rank 0's exception (None: none), raised on every rank: the others would wait for its
    broadcast otherwise (a hang)."""
    told = [one_line(error) if error is not None else None]
    dist.broadcast_object_list(told, src=0)
    if error is not None:
        raise error
    if told[0] is not None:
        raise RuntimeError(f"rank 0 failed to read the checkpoint: {told[0]}")


def _distribute_full_state(trainee, state: dict, paths, opts) -> None:
    """A torch.save file of the full state dict loaded by a sharded loader: every rank reads it
    whole and set_state_dict(full_state_dict=True) keeps its own shards (no broadcast)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    full = torch.load(paths.full_state, weights_only=True)
    set_state_dict(
        trainee.model,
        trainee.optimizer,
        model_state_dict=full["model"],
        optim_state_dict=full["optim"],
        options=replace(opts, full_state_dict=True),
    )
    for key, target in state.items():
        if key not in ("model", "optim"):
            target.load_state_dict(full[key])


def convert(variant: Variant, paths: CheckpointPaths) -> None:
    """The conversions of formats torch_save (DCP -> torch.save file) and torch_save_to_dcp
    (torch.save file -> DCP), in one process, no process group, as a user runs them offline."""
    if variant.format not in ("torch_save", "torch_save_to_dcp"):
        return
    # Imported only here: format_utils costs a save job about a second. format_utils' own
    # functions unpickle with weights_only=False; these are the same calls without that.
    from pipeline_lib.verify import untrusted

    if variant.format == "torch_save":
        untrusted.dcp_to_torch_save(paths.checkpoint, paths.full_state)
    else:
        untrusted.torch_save_to_dcp(paths.full_state, paths.checkpoint)


def stateful_as_dicts(state: dict) -> dict:
    """``state`` with its Stateful entries (the LR scheduler) as their state dicts."""
    return {k: v if k in ("model", "optim") else v.state_dict() for k, v in state.items()}


def _reader(variant: Variant, paths: CheckpointPaths):
    if variant.format.startswith("safetensors"):
        from torch.distributed.checkpoint import HuggingFaceStorageReader

        return HuggingFaceStorageReader(paths.checkpoint)
    from pipeline_lib.verify.untrusted import SafeFileSystemReader  # .metadata: no pickle.load

    return SafeFileSystemReader(paths.checkpoint)


def _load_stateful_from_rank0(state: dict, full: dict) -> None:
    """Entries beyond model and optimizer (the LR scheduler) from rank 0's full state."""
    for key, target in state.items():
        if key in ("model", "optim"):
            continue
        value = [full.get(key)]
        dist.broadcast_object_list(value, src=0)
        target.load_state_dict(value[0])
