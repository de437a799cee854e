"""Existing checkpoints (config key ``checkpoints``): a DCP folder written anywhere, by this
tool or another (torchtitan, your own job), or a Hugging Face ``save_pretrained`` folder (format
``hf_safetensors``, pipeline_lib.verify.hf_folder), loaded under every layout (docs:
existing-checkpoints.md). Imports torch.

There is no saver's memory, so the files are the reference: the import job reads every entry in one
process without a process group (pipeline_lib.verify.readers, ``.metadata`` through the restricted
unpickler, non-tensor entries through ``weights_only=True``), names them as this tool does
(pipeline_lib.verify.checkpoint_names) and writes them as a reference
(pipeline_lib.verify.reference) that the load cells compare with bit for bit. An entry the load
cannot place keeps its own name in the reference, so the cells report it as missing in the loader's
state."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException

from pipeline_lib import models
from pipeline_lib.common.atomic import write_json, write_text
from pipeline_lib.common.errors import one_line, printable
from pipeline_lib.job import reuse
from pipeline_lib.job.driver import fresh_dir
from pipeline_lib.job.import_job import base_record
from pipeline_lib.plan.specs import ExistingSpec
from pipeline_lib.verify import hf_folder, untrusted
from pipeline_lib.verify.checkpoint_names import EntryMap, Naming, partial_scheduler, place
from pipeline_lib.verify.checkpoint_names import uncompared as uncompared_names
from pipeline_lib.verify.entries import entry_table, flatten, leaves
from pipeline_lib.verify.readers import checkpoint_entries
from pipeline_lib.verify.reference import Reference
from pipeline_lib.verify.results import ImportRecord
from pipeline_lib.verify.untrusted import SafeFileSystemReader, SafeLoadPlanner


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


def placement(path: str, naming: str, model: str, kwargs: dict, entries=None) -> EntryMap:
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
    inputs did not change (pipeline_lib.job.reuse) and ``reuse_units``, its record written again
    byte for byte and its reference left as it is. A checkpoint that cannot be read gives an
    ``error`` record (its cells say why), never a crash. ``progress(step)``: the watchdog's
    marks (pipeline_lib.job.import_job runs this in a child process under one)."""
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
    write_json(spec.record, record.to_dict())
    if store and record.status == "ok":
        store.keep_imported(spec)


def _import(spec: ExistingSpec, progress: Callable[[str], None]) -> ImportRecord:
    """The record of one import (its reference written when the checkpoint reads)."""
    found = {}
    try:
        if spec.format == hf_folder.FORMAT:
            return base_record(spec, "ok", **_read_hf_folder(spec, progress))
        progress("hashing .metadata")
        found["metadata_sha256"] = metadata_sha256(spec.path)
        found.update(_read(spec, progress))
        if spec.manifest:
            found["writer_manifest"] = writer_manifest(spec.manifest)
        return base_record(spec, "ok", **found)
    except (Exception, CheckpointException) as exc:
        reason = printable(f"reading {spec.path}: {one_line(exc)}")
        return base_record(spec, "error", reason, **found)


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
    return {
        "entries": entry_table(flat, params),
        "excluded_entries": list(places.excluded),
        "unplaced_entries": list(places.unplaced),
        "flattened_optim": places.flattened_optim,
        "model_only": places.model_only,
        # The loader's entries this checkpoint has none of by design (naming.uncompared).
        "uncompared": PARTIAL_SCHEDULER if partial_scheduler(spec.naming, flat) else "",
        "state_check": {},
        "files_check": {},
        "resume_losses": [],
    }


def load(trainee, state: dict, path: str, places: EntryMap, opts) -> None:
    """Load the checkpoint at ``path`` into the trainee the way its writer named the entries:
    ``dcp.load`` of this tool's state under the checkpoint's names (every entry of the state
    must be in the checkpoint), then ``set_state_dict``, and the LR scheduler's own
    ``load_state_dict``. An entry of the state the checkpoint lacks keeps the loader's value
    (check 2 names it). A checkpoint's object entry that stands for a dict of the state (the
    LR scheduler's state as one entry) replaces that dict whole."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from pipeline_lib.job.checkpoint_io import stateful_as_dicts

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
    from pipeline_lib.job.checkpoint_io import stateful_as_dicts

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


# --- Hugging Face save_pretrained folders (format hf_safetensors) ----------------------------


def hf_anatomy(model: str, kwargs: dict) -> tuple[str, set[str], set[str], dict[str, str]]:
    """model_entries' answer and the model's tied entries (``model.<alias>`` -> the entry of
    the parameter's first name, as this tool names them), from one build on the meta device:
    save_pretrained writes a tied parameter once, under one of its names."""
    from pipeline_lib.verify.live import Anatomy

    with torch.device("meta"):
        base = models.get(model, kwargs).build(**kwargs)
    wrapper = "user_model." if hasattr(base, "user_model") else ""
    anatomy = Anatomy.of(base)
    tied = {f"model.{n}": f"model.{first}" for n, first in anatomy.first_name.items() if n != first}
    params = set(dict(base.named_parameters()))
    return wrapper, {f"model.{k}" for k in base.state_dict()}, params, tied


def hf_placement(path: str, naming: str, model: str, kwargs: dict, entries=None) -> EntryMap:
    """Where a Hugging Face folder's tensors go, from its checked headers (hf_folder.read_folder:
    nothing read before the folder's files are checked); ``entries``: hf_anatomy's answer."""
    wrapper, known, *_ = entries or hf_anatomy(model, kwargs)
    return place(hf_folder.read_folder(path).tensors, Naming(naming), known, wrapper)


def _read_hf_folder(spec: ExistingSpec, progress: Callable[[str], None]) -> dict:
    """The import of a Hugging Face folder: its files checked (hf_folder.read_folder), its
    config.json compared with the model's hf_models entry, every tensor read by the
    ``safetensors`` library (not the reader the cells test) under this tool's name of it, and a
    tied parameter the file holds once under its other names too (as the model ties them)."""
    progress("checking the folder's files")
    folder = hf_folder.read_folder(spec.path)
    found = hf_folder.config_json(spec.path)
    hf = spec.model_kwargs.get(models.HF_KEY)
    errors = hf_folder.config_errors(found, hf, spec.model) if found and hf else []
    if errors:
        raise hf_folder.HFFolderError("; ".join(errors))
    progress("building the model (meta device)")
    anatomy = hf_anatomy(spec.model, spec.model_kwargs)
    places = place(folder.tensors, Naming(spec.naming), anatomy[1], anatomy[0])
    flat = {}
    for name, value in hf_folder.tensors(folder):
        progress("reading the entries")
        if name not in places.excluded:
            flat[places.ours.get(name, name)] = value
    tied = {
        alias: first for alias, first in anatomy[3].items() if alias not in flat and first in flat
    }
    flat.update({alias: flat[first] for alias, first in tied.items()})
    progress("writing the reference")
    Reference.write(spec.reference, flat, rank=0)
    return {
        "metadata_sha256": folder.digest(),
        "format": hf_folder.FORMAT,
        "files": list(folder.files),
        "config_json": hf_folder.summary(found),
        "entries": entry_table(flat, anatomy[2]),
        "excluded_entries": list(places.excluded),
        "unplaced_entries": list(places.unplaced),
        "tied_entries": tied,
        "flattened_optim": False,
        "model_only": places.model_only,
        "state_check": {},
        "files_check": {},
        "resume_losses": [],
    }


def load_hf_folder(trainee, state: dict, path: str, places: EntryMap, opts) -> None:
    """Load a Hugging Face folder's weights into the trainee as a trainer starting to fine-tune
    does: its files checked (hf_folder.read_folder, as the import did), ``dcp.load`` of the
    model's state under the folder's names with DCP's ``HuggingFaceStorageReader``, then
    ``set_model_state_dict``. The optimizer is not loaded (``fresh_optimizer``). An entry of
    the model the folder lacks keeps the loader's value (check 2 names it; a tied parameter is
    loaded through its other name)."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    from pipeline_lib.job.checkpoint_io import stateful_as_dicts

    hf_folder.read_folder(path)
    dicts = stateful_as_dicts(state)
    spots = leaves(dicts)
    target = {}
    for entry, ours in places.ours.items():
        if spot := _spot(dicts, ours, spots):
            holder, key = spot
            target[entry] = holder[key]
    dcp.load(target, storage_reader=HuggingFaceStorageReader(path))
    set_model_state_dict(trainee.model, dicts["model"], options=opts)


def fresh_optimizer(item, trainee) -> None:
    """After the load of a model-only checkpoint and check 2: a new optimizer and LR scheduler
    of the loader's recipe over the loaded model, as a trainer makes them after loading model
    weights (the one the load job built, whose state get_state_dict initialized with a zero
    step, is dropped): the resume starts from no optimizer state."""
    from pipeline_lib.job import optimizers

    trainee.optimizer, trainee.scheduler = optimizers.make(
        item.variant.optimizer, trainee.model, item.train["lr"]
    )
