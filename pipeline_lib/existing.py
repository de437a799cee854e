"""Existing checkpoints (config key ``checkpoints``): a DCP folder written anywhere, by this
tool or another (torchtitan, your own job), loaded under every layout (docs:
existing-checkpoints.md). Imports torch.

There is no saver's memory, so the files are the reference: the import job reads every entry
in one process without a process group (pipeline_lib.readers, ``.metadata`` through the
restricted unpickler, non-tensor entries through ``weights_only=True``), names them as this
tool does (pipeline_lib.naming) and writes them as a reference (pipeline_lib.reference) that
the load cells compare with bit for bit. An entry the load cannot place keeps its own name in
the reference, so the cells report it as missing in the loader's state.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException

from pipeline_lib import models, reuse, untrusted
from pipeline_lib.atomic import write_json, write_text
from pipeline_lib.driver import fresh_dir
from pipeline_lib.entries import describe, entry_kind, flatten, leaves
from pipeline_lib.errors import one_line, printable
from pipeline_lib.import_job import base_record
from pipeline_lib.naming import Naming, Placement, partial_scheduler, place
from pipeline_lib.naming import uncompared as uncompared_names
from pipeline_lib.readers import checkpoint_entries
from pipeline_lib.reference import Reference
from pipeline_lib.specs import ExistingSpec
from pipeline_lib.untrusted import SafeFileSystemReader, SafeLoadPlanner


def metadata_sha256(path: str) -> str:
    """The SHA-256 of the checkpoint's ``.metadata`` (which checkpoint a row is about), read in
    blocks, and only a regular file inside the folder of a bounded size (untrusted)."""
    return untrusted.metadata_sha256(path)


def model_entries(model: str, kwargs: dict) -> tuple[str, set[str], set[str]]:
    """(what this tool puts before the model's own parameter names, the model's entries as
    this tool names them, its parameters' names), from the model built on the meta device (no
    values, no process group); ``kwargs``: its ``model_kwargs`` (an hf_models entry)."""
    with torch.device("meta"):
        base = models.get(model, kwargs).build(**kwargs)
    # Your own model and an hf_models one run inside models._user.UserModel.
    wrapper = "user_model." if hasattr(base, "user_model") else ""
    return wrapper, {f"model.{k}" for k in base.state_dict()}, set(dict(base.named_parameters()))


def placement(path: str, naming: str, model: str, kwargs: dict, entries=None) -> Placement:
    """Where the checkpoint's entries go, from its ``.metadata`` (read without unpickling
    anything beyond DCP's metadata); ``entries``: model_entries' answer, if already known."""
    wrapper, known, _ = entries or model_entries(model, kwargs)
    names = SafeFileSystemReader(path).read_metadata().state_dict_metadata
    return place(names, Naming(naming), known, wrapper)


def import_checkpoint(
    spec: ExistingSpec,
    progress: Callable[[str], None] = lambda step: None,
    reuse_units: bool = True,
) -> None:
    """The import job: the reference and the record of one existing checkpoint, or, when its
    inputs did not change (pipeline_lib.reuse) and ``reuse_units``, its record written again
    byte for byte and its reference left as it is. A checkpoint that cannot be read gives an
    ``error`` record (its cells say why), never a crash. ``progress(step)``: the watchdog's
    marks (pipeline_lib.import_job runs this in a child process under one)."""
    progress("checking for an earlier import")
    store = reuse.Store.of(spec, read=reuse_units)
    kept = store and store.imported_record(spec)
    if store:
        reuse.announce("imports", int(bool(kept)), 1, store)
    if kept:
        write_text(spec.record, kept)
        return
    fresh_dir(Path(spec.save_dir))
    record = _import(spec, progress)
    write_json(spec.record, record)
    if store and record["status"] == "ok":
        store.keep_imported(spec)


def _import(spec: ExistingSpec, progress: Callable[[str], None]) -> dict:
    """The record of one import (its reference written when the checkpoint reads)."""
    record = base_record(spec)
    try:
        progress("hashing .metadata")
        record["metadata_sha256"] = metadata_sha256(spec.path)
        record.update(_read(spec, progress), status="ok", reason="")
        if spec.manifest:
            record["writer_manifest"] = writer_manifest(spec.manifest)
    except (Exception, CheckpointException) as exc:
        reason = printable(f"reading {spec.path}: {one_line(exc)}")
        record.update(status="error", reason=reason)
    return record


PARTIAL_SCHEDULER = (
    "the loader's scheduler.<key> entries other than scheduler.last_epoch: torchtitan's "
    "LRSchedulersContainer saves last_epoch only"
)
# A writer's manifest is read whole: at most this many bytes (it is untrusted input).
MANIFEST_MAX_BYTES = 1 << 20


def writer_manifest(path: str) -> dict:
    """The writer's manifest (``checkpoints.<name>.manifest``): a JSON object of at most
    MANIFEST_MAX_BYTES, from a regular file; ValueError (the import's error) otherwise."""
    import json
    import os
    import stat

    # Opened without blocking (a FIFO would wait for a writer), read only if a regular file.
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError(f"manifest {path} is not a regular file")
        data = f.read(MANIFEST_MAX_BYTES + 1)
    found = json.loads(data) if len(data) <= MANIFEST_MAX_BYTES else None
    if not isinstance(found, dict):
        raise ValueError(f"manifest {path} is not a JSON object of at most {MANIFEST_MAX_BYTES} B")
    return found


def _read(spec: ExistingSpec, progress: Callable[[str], None]) -> dict:
    """Read every entry, write the reference; the record's account of the entries. The first
    entry that cannot be read ends the import (its reason names it): nothing more is read."""
    progress("building the model (meta device)")
    anatomy = model_entries(spec.model, spec.model_kwargs)  # one meta build
    progress("placing the entries (the naming)")
    places = placement(spec.path, spec.naming, spec.model, spec.model_kwargs, anatomy)
    params = anatomy[2]
    flat = {}
    for name, value in checkpoint_entries(spec.path):
        progress("reading the entries")
        if name in places.excluded:
            continue
        if isinstance(value, BaseException):
            raise ValueError(f"unreadable entry {printable(name)} ({one_line(value)})")
        ours = places.ours.get(name, name)
        # An object entry holding a dict (the LR scheduler's, as DCP up to torch 2.3 wrote
        # it) is its leaves, as every state of this tool is flattened (entries.flatten).
        flat.update(flatten({ours: places.value(ours, value)}))
    progress("writing the reference")
    Reference.write(spec.reference, flat, rank=0)
    entries = {}
    for name, value in flat.items():
        dtype, shape = describe(value)
        entries[name] = {"kind": entry_kind(name, params), "dtype": dtype, "shape": shape}
    return {
        "entries": entries,
        "excluded_entries": list(places.excluded),
        "unplaced_entries": list(places.unplaced),
        "flattened_optim": places.flattened_optim,
        # The loader's entries this checkpoint has none of by design (naming.uncompared).
        "uncompared": PARTIAL_SCHEDULER if partial_scheduler(spec.naming, flat) else "",
        "state_check": {},
        "files_check": {},
        "resume_losses": [],
    }


def load(trainee, state: dict, path: str, places: Placement, opts) -> None:
    """Load the checkpoint at ``path`` into the trainee the way its writer named the entries:
    ``dcp.load`` of this tool's state under the checkpoint's names (every entry of the state
    must be in the checkpoint), then ``set_state_dict``, and the LR scheduler's own
    ``load_state_dict``. An entry of the state the checkpoint lacks keeps the loader's value
    (check 2 names it). A checkpoint's object entry that stands for a dict of the state (the
    LR scheduler's state as one entry) replaces that dict whole."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from pipeline_lib.checkpoint_io import stateful_as_dicts

    dicts = stateful_as_dicts(state)
    spots = leaves(dicts)
    where = {
        entry: spot for entry, ours in places.ours.items() if (spot := _spot(dicts, ours, spots))
    }
    # A tensor is loaded in place; any other value (a dict standing for one object entry:
    # None) comes back as a new object.
    target = {entry: _target(holder[key]) for entry, (holder, key) in where.items()}
    dcp.load(target, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner())
    for entry, (holder, key) in where.items():
        holder[key] = places.value(places.ours[entry], target[entry])
    set_state_dict(
        trainee.model,
        trainee.optimizer,
        model_state_dict=dicts["model"],
        optim_state_dict=dicts["optim"],
        options=opts,
    )
    if "scheduler" in state:
        # The checkpoint's keys over the loader's own: a writer that saves part of its
        # scheduler's state restores that part (torchtitan's LRSchedulersContainer: last_epoch
        # only, each lr recomputed from the optimizer's base_lrs), as its own load does.
        own = state["scheduler"].state_dict()
        state["scheduler"].load_state_dict({**own, **dicts["scheduler"]})


def uncompared(source, state: dict) -> list[str]:
    """The loader's entries (of ``state``) that ``source``'s checkpoint has no counterpart for
    by its writer's design (naming.uncompared), from its reference's names."""
    from pipeline_lib.checkpoint_io import stateful_as_dicts

    saved = Reference(source.paths.reference).meta
    return uncompared_names(source.naming, saved, flatten(stateful_as_dicts(state)))


def _target(value):
    """What dcp.load fills for an entry: the tensor itself, or a stand-in for any other value
    (a dict: one object entry, not the entries DCP would flatten it into)."""
    return value if isinstance(value, torch.Tensor) else None


def _spot(state: dict, name: str, spots: dict) -> tuple | None:
    """(the dict or list holding it, its key there) of ``name`` in the flattened ``state``: a
    leaf (``spots``: entries.leaves) or a dict or list of leaves; None where there is none."""
    if name in spots:
        return spots[name]
    return _inner(state, name, "")


def _inner(state, name: str, prefix: str) -> tuple | None:
    items = state.items() if isinstance(state, dict) else enumerate(state)
    for key, value in items:
        here = f"{prefix}{key}"
        if here == name:
            return state, key
        if name.startswith(here + ".") and isinstance(value, (dict, list)):
            found = _inner(value, name, here + ".")
            if found:
                return found
    return None
