"""Faults injected on purpose, to prove that every check can fail (the ``faults`` config axis).

Each fault names the status the verifier must give. Stages:
- ``checkpoint``: change the files right after the save wrote them (rank 0 of the save job),
  before any check reads them (returns a description naming the file and entry it changed);
- ``save`` / ``load``: the worker breaks itself at that phase (``inject``, and in
  pipeline_lib.job.worker / checks): the last rank is SIGKILLed or hangs, rank 0 dies by SIGSEGV,
  the load is skipped, an entry is dropped from the loader's state, the resume runs with twice
  the learning rate;
- ``source``: the load job reads a checkpoint written by a different model;
- ``state``: the state dict ``get_state_dict`` returns is corrupted the same way on the save and
  the load side (``corrupt``), as a state-dict API that returns wrong values would: only a check
  independent of that API (the saver's state dict vs its live objects) can see it;
- ``sealed`` (``verify.reference: sealed`` only): change the files, or the seal, after the save
  job sealed them (rank 0, ``apply_after_seal``), as a file changed between the jobs: the load
  job's seal check must name the file.
- ``sequence``: the checkpointer a save sequence keeps for its saves writes the wrong step's
  state (pipeline_lib.job.sequence_saver); the fault's cell runs a sequence (``axes``).
"""

from __future__ import annotations

import io
import os
import pickle
import signal
import struct
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Fault:
    name: str
    stage: str  # checkpoint, save, load, source or state
    expect: str  # the status a correct verifier gives
    apply: Callable[[Path], str] | None = None  # checkpoint faults only
    # state faults only: corrupt(model_state, optim_state, at_build) changes the state dicts in
    # place; at_build: the model state dict as it was right after the build
    corrupt: Callable[[dict, dict, dict], None] | None = None
    # The axes' values of the fault's cell where it means something in one variant only
    # (pipeline_lib.plan.axes.Variant keywords; none: the default variant).
    axes: tuple[tuple[str, str], ...] = ()


def _metadata(checkpoint: Path):
    # Through the restricted unpickler, as every read of .metadata, and confined to the folder
    # (the faults change, cut and delete the files it names: docs/untrusted-checkpoints.md).
    from pipeline_lib.verify.untrusted import confine, load_metadata

    path = checkpoint / ".metadata"
    with open(path, "rb") as f:
        metadata = load_metadata(f, str(path))
    confine(metadata, checkpoint, str(path))
    return metadata


def _write_metadata(checkpoint: Path, metadata) -> None:
    with open(checkpoint / ".metadata", "wb") as f:
        pickle.dump(metadata, f)


def _first_tensor_item(metadata):
    """(fqn, storage info) of the first non-empty tensor chunk, in a fixed order."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    def key(item):
        return item[0].fqn, str(item[0].offset)

    for index, info in sorted(metadata.storage_data.items(), key=key):
        meta = metadata.state_dict_metadata[index.fqn]
        if isinstance(meta, TensorStorageMetadata) and meta.size.numel() > 0 and info.length > 0:
            return index.fqn, info
    raise ValueError("checkpoint holds no tensor data")


def flip_byte(checkpoint: Path) -> str:
    """Flip the lowest bit of the first element of one tensor chunk (one ulp for a float)."""
    fqn, info = _first_tensor_item(_metadata(checkpoint))
    path = checkpoint / info.relative_path
    blob = bytearray(path.read_bytes())
    item = bytes(blob[info.offset : info.offset + info.length])
    # Each chunk is a torch.save zip archive; find the start of its tensor bytes.
    with zipfile.ZipFile(io.BytesIO(item)) as archive:
        data = next(z for z in archive.infolist() if "/data/" in z.filename)
    header = item[data.header_offset + 26 : data.header_offset + 30]
    name_len, extra_len = struct.unpack("<HH", header)
    position = info.offset + data.header_offset + 30 + name_len + extra_len
    blob[position] ^= 0x01
    path.write_bytes(bytes(blob))
    return f"flipped one bit of {fqn} in {info.relative_path} at byte {position}"


def truncate_shard(checkpoint: Path) -> str:
    """Cut the shard file that holds the first tensor chunk to half its size."""
    fqn, info = _first_tensor_item(_metadata(checkpoint))
    path = checkpoint / info.relative_path
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    return f"truncated {info.relative_path} (holds {fqn}) from {size} to {size // 2} bytes"


def delete_shard(checkpoint: Path) -> str:
    fqn, info = _first_tensor_item(_metadata(checkpoint))
    (checkpoint / info.relative_path).unlink()
    return f"deleted {info.relative_path} (holds {fqn})"


def delete_metadata(checkpoint: Path) -> str:
    (checkpoint / ".metadata").unlink()
    return "deleted .metadata"


def drop_entry(checkpoint: Path) -> str:
    """Remove one tensor entry from .metadata (its bytes stay in the shard)."""
    metadata = _metadata(checkpoint)
    fqn, _ = _first_tensor_item(metadata)
    del metadata.state_dict_metadata[fqn]
    metadata.storage_data = {k: v for k, v in metadata.storage_data.items() if k.fqn != fqn}
    _write_metadata(checkpoint, metadata)
    return f"dropped entry {fqn} from .metadata"


def change_shape(checkpoint: Path) -> str:
    """Grow the last dim of one tensor entry's shape in .metadata."""
    import torch

    metadata = _metadata(checkpoint)
    fqn, _ = _first_tensor_item(metadata)
    meta = metadata.state_dict_metadata[fqn]
    old = list(meta.size)
    meta.size = torch.Size([*old[:-1], old[-1] + 1])
    _write_metadata(checkpoint, metadata)
    return f"changed the shape of {fqn} from {old} to {list(meta.size)} in .metadata"


def change_dtype(checkpoint: Path) -> str:
    """Record float64 instead of float32 for one tensor entry in .metadata."""
    import torch

    metadata = _metadata(checkpoint)
    fqn, _ = _first_tensor_item(metadata)
    properties = metadata.state_dict_metadata[fqn].properties
    old, properties.dtype = properties.dtype, torch.float64
    _write_metadata(checkpoint, metadata)
    return f"changed the dtype of {fqn} from {old} to {properties.dtype} in .metadata"


def alias_optim_state(model_state: dict, optim_state: dict, at_build: dict) -> None:
    """The first parameter's ``exp_avg`` returned as its ``exp_avg_sq`` (one tensor under two
    names, as FSDP1's full optimizer state dict on a CPU device does, torch 2.14.1)."""
    state = optim_state["state"]
    fqn = min(name for name, entry in state.items() if {"exp_avg", "exp_avg_sq"} <= set(entry))
    state[fqn]["exp_avg"] = state[fqn]["exp_avg_sq"]


def swap_entries(model_state: dict, optim_state: dict, at_build: dict) -> None:
    """The first two model entries of one shape and dtype returned under each other's names."""
    names = sorted(model_state)
    a, b = next(
        (a, b)
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        if (model_state[a].shape, model_state[a].dtype)
        == (model_state[b].shape, model_state[b].dtype)
    )
    model_state[a], model_state[b] = model_state[b], model_state[a]


def stale_param(model_state: dict, optim_state: dict, at_build: dict) -> None:
    """The first model entry returned with its value from before training (a stale copy)."""
    name = min(model_state)
    model_state[name] = at_build[name]


def change_after_seal(checkpoint: Path) -> str:
    return f"after sealing: {flip_byte(checkpoint)}"


def delete_after_seal(checkpoint: Path) -> str:
    return f"after sealing: {delete_shard(checkpoint)}"


def corrupt_seal(checkpoint: Path) -> str:
    """Change the digest the seal holds for its first file (the file itself stays)."""
    import json

    from pipeline_lib.verify.seal_file import seal_path

    path = Path(seal_path(str(checkpoint)))
    data = json.loads(path.read_text())
    name = min(data["files"])
    digest = data["files"][name]["digest"]
    data["files"][name]["digest"] = ("0" if digest[0] != "0" else "1") + digest[1:]
    path.write_text(json.dumps(data))
    return f"changed the digest of {name} in {path.name}"


# The variant of a sequence fault's cell: the cells load the last checkpoint.
_SEQUENCE = (("save_sequence", "load_last"),)

FAULTS: dict[str, Fault] = {
    f.name: f
    for f in [
        Fault("flip_byte", "checkpoint", "fail", flip_byte),
        Fault("truncate_shard", "checkpoint", "fail", truncate_shard),
        Fault("delete_shard", "checkpoint", "fail", delete_shard),
        Fault("delete_metadata", "checkpoint", "fail", delete_metadata),
        Fault("drop_entry", "checkpoint", "fail", drop_entry),
        Fault("change_shape", "checkpoint", "fail", change_shape),
        Fault("change_dtype", "checkpoint", "fail", change_dtype),
        Fault("foreign_checkpoint", "source", "error"),
        Fault("alias_optim_state", "state", "fail", corrupt=alias_optim_state),
        Fault("swap_entries", "state", "fail", corrupt=swap_entries),
        Fault("stale_param", "state", "fail", corrupt=stale_param),
        Fault("skip_load", "load", "fail"),
        Fault("drop_loaded_entry", "load", "fail"),
        Fault("skew_resume_lr", "load", "fail"),
        Fault("kill_rank_save", "save", "crash"),
        Fault("kill_rank_load", "load", "crash"),
        Fault("segfault_save", "save", "crash"),
        Fault("segfault_load", "load", "crash"),
        Fault("hang_save", "save", "timeout"),
        Fault("hang_load", "load", "timeout"),
        Fault("change_after_seal", "sealed", "fail", change_after_seal),
        Fault("delete_after_seal", "sealed", "fail", delete_after_seal),
        Fault("corrupt_seal", "sealed", "fail", corrupt_seal),
        # Every save of a sequence after the first writes the state the checkpointer took at
        # the first, as a checkpointer that stages once and never again (NeMo RL #3312: with
        # async saving, every checkpoint after the first equal to the first).
        Fault("stale_save", "sequence", "fail", axes=(*_SEQUENCE, ("async_save", "thread"))),
        # The first save of a sequence writes the state as it is after the next optimizer
        # step, as an async save that captures its tensors late (pytorch #144657).
        Fault("future_save", "sequence", "fail", axes=(*_SEQUENCE, ("async_save", "process"))),
    ]
}


# The stages whose fault the save job injects (the others: the load job).
SAVE_STAGES = ("checkpoint", "save", "state", "sealed", "sequence")


def campaign(verify: dict) -> list[str]:
    """The faults of ``fault: all``: those of stage ``sealed`` in sealed mode only, those of
    stage ``sequence`` in exact mode only (a save sequence is checked against the saver's
    reference at each step, which sealed mode does not write)."""
    sealed = verify.get("reference", "exact") == "sealed"
    wrong_mode = "sequence" if sealed else "sealed"
    return [name for name, f in FAULTS.items() if f.stage != wrong_mode]


# Faults that mean something in one mode only, hence not in the campaign (whose cells are of the
# default variant, but a sequence fault's: Fault.axes): tests/test_mode_pairs.py injects them
# into a cell of that mode.
MODE_FAULTS = {
    # modes strict_unexpected / non_strict_unexpected: the loader does not load the checkpoint's
    # model entries its model lacks (a loader reading only its own keys, as dcp.load does).
    "ignore_unexpected": "fail",
}


# Faults that mean something for engine torch_checkpointing only, hence not in the campaign
# (whose cells are DCP's): tests/test_engines.py injects them into such a save.
ENGINE_FAULTS = {
    # The first model entry's first element changed in rank 0's model file of the library
    # (model_0.pt, a torch.save of the item), as a write that stored a wrong value.
    "change_engine_value": "fail",
}


def change_engine_value(checkpoint: Path) -> str:
    """change_engine_value: in torch_checkpointing's ``model_0.pt`` (a dict of tensors written
    with torch.save), add 1 to the first element of the first entry, then save it back."""
    import torch

    path = checkpoint / "model_0.pt"
    state = torch.load(path, weights_only=True)
    name = min(state)
    state[name].view(-1)[0] += 1
    torch.save(state, path)
    return f"changed model.{name}[0] in {path.name}"


# Faults that mean something under pipeline parallelism only, hence not in the campaign:
# tests/test_pp.py injects them into a cell whose saver is a pipeline-parallel layout.
PIPELINE_FAULTS = {
    # The saver's last stage writes none of its model entries (a save under PP that wrote only
    # some stages' parameters, torchtitan #474).
    "drop_last_stage": "fail",
    # Format hf_export: the last stage exports none of its tensors (a consolidation under PP
    # that dropped the last stage's keys, NeMo Automodel #2096).
    "drop_last_stage_export": "fail",
}


# Faults that mean something under expert parallelism only, hence not in the campaign:
# tests/test_ep.py injects them into a cell whose saver is an expert-parallel layout.
EXPERT_FAULTS = {
    # The saver's state dict holds each rank's own experts as a plain tensor under the whole
    # entry's name (a save that keeps one rank's experts: DCP writes one of the copies).
    "keep_local_experts": "fail",
}


# Faults about the optimizer state a load leaves, hence not in the campaign (an empty state
# needs a stateless optimizer): tests/test_histories.py injects them into a cell's load, after
# the load and before check 2 reads the loader.
HISTORY_FAULTS = {
    # The first parameter with optimizer state loses it (a load that drops a parameter's
    # state, as torch's of a parameter trained then frozen: pytorch #192202).
    "drop_loaded_optim_state": "fail",
    # The first parameter without optimizer state gains an empty one, {} (a stateless
    # optimizer gaining entries in a load: pytorch #192225).
    "add_empty_optim_state": "fail",
}


def break_loaded_optim_state(fault: str | None, optimizer) -> None:
    """drop_loaded_optim_state / add_empty_optim_state on the loader's optimizer (in place)."""
    if fault not in HISTORY_FAULTS:
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if fault == "drop_loaded_optim_state":
        del optimizer.state[next(p for p in params if p in optimizer.state)]
    else:
        stateless = [p for p in params if p not in optimizer.state]
        if not stateless:
            raise ValueError("add_empty_optim_state: every parameter has optimizer state")
        optimizer.state[stateless[0]] = {}


def keep_local_experts(fault: str | None, model_state: dict, side: str) -> None:
    """keep_local_experts: on the saver, every expert entry (a DTensor sharded over the ``ep``
    mesh dim) becomes this rank's local tensor."""
    if fault != "keep_local_experts" or side != "save":
        return
    from pipeline_lib.models._expert_parallel import is_expert_entry  # imports torch

    for name, value in model_state.items():
        if is_expert_entry(value):
            model_state[name] = value.to_local()


# Faults that mean something for a model with adapters only (an hf_models entry with lora),
# hence not in the campaign: tests/test_lora.py injects them into a cell whose saver shards
# the adapters (FSDP2).
ADAPTER_FAULTS = {
    # The saver writes only rank 0's shard of every sharded adapter weight, every other rank's
    # part zero: an adapter-only save under FSDP2 that kept rank 0's slice (accelerate PR #4206,
    # FULL_STATE_DICT with adapter_only; axolotl #3772: 1/world_size of each lora_B, the rest 0).
    "adapter_rank0_shard": "fail",
}
# Parts of an entry's name that mark an adapter's weight (peft's LoRA layers).
ADAPTER_PARTS = (".lora_A.", ".lora_B.")


def keep_rank0_adapter_shard(fault: str | None, state: dict, model, full: bool) -> None:
    """adapter_rank0_shard, on every rank once get_state_dict has run (check 0 passed) and
    before the write: each adapter entry sharded over the ranks (a DTensor with a Shard
    placement) keeps rank 0's local part, the others' become zeros. ``full``: the state is the
    full state dict on rank 0, which gets the entry gathered from those parts."""
    if fault != "adapter_rank0_shard":
        return
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.tensor import DTensor

    sharded = get_model_state_dict(model)  # the same names, as DTensors, on every rank
    for name in sorted(n for n in sharded if any(p in f".{n}" for p in ADAPTER_PARTS)):
        value = sharded[name]
        if not isinstance(value, DTensor) or all(p.is_replicate() for p in value.placements):
            continue
        local = value.to_local()
        kept = local if dist.get_rank() == 0 else torch.zeros_like(local)
        rank0 = DTensor.from_local(
            kept, value.device_mesh, value.placements, shape=value.shape, stride=value.stride()
        )
        if full:  # a collective: every rank gathers, rank 0 holds the full state
            rank0 = rank0.full_tensor()
        if name in state["model"]:
            state["model"][name] = rank0.to(state["model"][name].device)


# Faults that mean something for a model whose extra state is not a tensor only, hence not in
# the campaign: tests/test_seeds.py injects them into a cell of mlp_object_state.
OBJECT_STATE_FAULTS = {
    # After the load, a module's extra state (a string, or a dict holding one) is set again with
    # its first string changed: a load that restored it wrong.
    "change_extra_state": "fail",
}


def change_extra_state(fault: str | None, model) -> None:
    """change_extra_state, on the loader after its load: the first module (in module order)
    whose ``get_extra_state`` holds a string gets it back with that string prefixed."""
    if fault != "change_extra_state":
        return
    from torch import nn

    for module in model.modules():
        if type(module).get_extra_state is nn.Module.get_extra_state:
            continue
        state = module.get_extra_state()
        if isinstance(state, str):
            module.set_extra_state(f"changed-{state}")
            return
        items = state.items() if isinstance(state, dict) else ()
        texts = [key for key, value in items if isinstance(value, str)]
        if texts:
            module.set_extra_state({**state, texts[0]: f"changed-{state[texts[0]]}"})
            return


def drop_last_stage(fault: str | None, model_state: dict, pipeline, side: str) -> None:
    """drop_last_stage: on the saver's last pipeline stage, the model state holds nothing."""
    if fault == "drop_last_stage" and side == "save" and pipeline and pipeline.is_last:
        model_state.clear()


def drop_last_stage_export(fault: str | None, state: dict, pipeline) -> dict:
    """drop_last_stage_export: the state the last pipeline stage exports is empty."""
    if fault == "drop_last_stage_export" and pipeline and pipeline.is_last:
        return {}
    return state


# --- hooks: where the jobs break themselves (pipeline_lib.job.worker, training, checks)
# ------------
def inject(phase: str, fault: str | None, rank: int, world_size: int) -> None:
    """Worker faults: break this job on purpose at ``phase`` (save or load): the last rank is
    SIGKILLed or hangs (the other ranks block in the next collective), rank 0 dies by SIGSEGV."""
    last = world_size - 1
    if fault == f"kill_rank_{phase}" and rank == last:
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault == f"hang_{phase}" and rank == last:
        time.sleep(10**6)
    elif fault == f"segfault_{phase}" and rank == 0:
        os.kill(os.getpid(), signal.SIGSEGV)


def corrupt_state(fault: str | None, model_state: dict, optim_state: dict, at_build: dict):
    """State faults: corrupt what get_state_dict returned, in place."""
    if fault in FAULTS and FAULTS[fault].stage == "state":
        FAULTS[fault].corrupt(model_state, optim_state, at_build)


def wants_state_at_build(fault: str | None) -> bool:
    """The fault returns a state taken right after the build (stale_param)."""
    return fault == "stale_param"


def ignores_unexpected(fault: str | None) -> bool:
    """ignore_unexpected: the loader loads only its own model's entries."""
    return fault == "ignore_unexpected"


def stale_save(fault: str | None) -> bool:
    """stale_save: every save of a sequence after the first writes the first one's state."""
    return fault == "stale_save"


def future_save(fault: str | None) -> bool:
    """future_save: the first save of a sequence writes the state after the next update."""
    return fault == "future_save"


def skew_resume(fault: str | None, optimizer) -> None:
    """skew_resume_lr: the loader resumes with twice the learning rate."""
    if fault == "skew_resume_lr":
        for group in optimizer.param_groups:
            group["lr"] *= 2


def apply_to_checkpoint(fault: str | None, checkpoint: Path) -> str | None:
    """Checkpoint faults: change the written files; a description naming file and entry."""
    if fault == "change_engine_value":
        return change_engine_value(checkpoint)
    if fault in FAULTS and FAULTS[fault].stage == "checkpoint":
        return FAULTS[fault].apply(checkpoint)
    return None


def apply_after_seal(fault: str | None, checkpoint: Path) -> str | None:
    """Sealed faults: change the files or the seal after sealing; a description naming them."""
    if fault in FAULTS and FAULTS[fault].stage == "sealed":
        return FAULTS[fault].apply(checkpoint)
    return None


def foreign_model(model: str) -> str:
    """The model whose checkpoint a ``foreign_checkpoint`` fault hands to ``model``'s loader."""
    return "mlp_uneven" if model == "mlp" else "mlp"
