"""State entries: flatten a state dict the way DCP names its entries, gather one entry at a time,
and compare entries bit for bit. Imports torch."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner
from torch.distributed.tensor import DTensor, distribute_tensor


def flatten(state: Mapping, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts (and lists holding dicts, lists or tensors) into 'a.b.0.c' keys,
    matching the entry names DCP writes to .metadata."""
    flat: dict[str, Any] = {}
    items = state.items() if isinstance(state, Mapping) else enumerate(state)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) or (isinstance(value, list) and _holds_structure(value)):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _holds_structure(values: list) -> bool:
    return any(isinstance(v, (Mapping, list, torch.Tensor)) for v in values)


def full_value(value: Any) -> Any:
    """The whole (unsharded) value of an entry on CPU. Collective for a DTensor: every rank must
    call it for the same entries in the same order."""
    if isinstance(value, DTensor):
        return value.full_tensor().cpu()
    if isinstance(value, torch.Tensor):
        if type(value) is not torch.Tensor:
            raise TypeError(f"unsupported sharded tensor type {type(value).__name__}")
        return value.detach().cpu()
    return value


def compare_local(expected: Any, actual: Any) -> EntryComparison:
    """Compare this rank's part of an entry with the whole ``expected`` value, no collective:
    a DTensor's local shard with the slice of ``expected`` that its placements give this rank
    (``distribute_tensor`` with ``src_data_rank=None`` slices locally, by DTensor's own
    rules); any other value whole. Every rank checks its own shard, replicas included."""
    if not isinstance(actual, DTensor):
        return compare(expected, full_value(actual))
    if not isinstance(expected, torch.Tensor) or (expected.dtype, expected.shape) != (
        actual.dtype,
        actual.shape,
    ):
        # Global type, dtype and shape first (slicing another shape compares the wrong parts);
        # compare() names the difference from a stand-in without data.
        return compare(expected, torch.empty(actual.shape, dtype=actual.dtype, device="meta"))
    mine = distribute_tensor(
        expected, actual.device_mesh, actual.placements, src_data_rank=None
    ).to_local()
    return compare(mine.cpu(), actual.to_local().detach().cpu())


def merge(parts: list[EntryComparison]) -> EntryComparison:
    """One entry's comparison from every rank's (equal only if equal everywhere)."""
    notes = [p.note for p in parts if p.note]
    diffs = [p.max_abs_diff for p in parts if p.max_abs_diff is not None]
    return EntryComparison(
        all(p.equal for p in parts),
        max(diffs) if len(diffs) == len(parts) else None,
        notes[0] if notes else "",
    )


def entry_kind(entry: str, param_names: set[str]) -> str:
    """param, buffer, optim.<state key> (exp_avg, step, ...) or optim.param_groups."""
    if entry.startswith("model."):
        return "param" if entry[len("model.") :] in param_names else "buffer"
    if entry.startswith("optim.state."):
        return "optim." + entry.rsplit(".", 1)[1]
    if entry.startswith("optim.param_groups."):
        return "optim.param_groups"
    return "other"


def describe(value: Any) -> tuple[str, list[int] | None]:
    """(dtype, shape) of an entry; non-tensor entries have the Python type and no shape."""
    if isinstance(value, torch.Tensor):
        return str(value.dtype).removeprefix("torch."), list(value.shape)
    return type(value).__name__, None


@dataclass
class EntryComparison:
    equal: bool
    max_abs_diff: float | None
    note: str = ""


def unmatched(note: str) -> dict:
    """The record of an entry only one side holds, or that could not be read: not equal, with
    no difference to measure."""
    return vars(EntryComparison(False, None, note))


def compare(expected: Any, actual: Any) -> EntryComparison:
    """Bit-for-bit comparison; max_abs_diff is informative (NaN-aware, in float64)."""
    exp_is_tensor, act_is_tensor = (
        isinstance(expected, torch.Tensor),
        isinstance(actual, torch.Tensor),
    )
    if exp_is_tensor != act_is_tensor:
        return EntryComparison(
            False, None, f"type {type(expected).__name__} != {type(actual).__name__}"
        )
    if not exp_is_tensor:
        equal = _plain(expected) == _plain(actual)
        return EntryComparison(equal, None, "" if equal else f"value {expected!r} != {actual!r}")
    if expected.dtype != actual.dtype:
        return EntryComparison(False, None, f"dtype {expected.dtype} != {actual.dtype}")
    if expected.shape != actual.shape:
        return EntryComparison(False, None, f"shape {list(expected.shape)} != {list(actual.shape)}")
    if _bytes_equal(expected, actual):
        # Equal bytes differ by 0; the float64 difference costs more than the comparison.
        return EntryComparison(True, 0.0)
    return EntryComparison(False, _max_abs_diff(expected, actual), "bytes differ")


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The bytes of two tensors of one dtype and shape are equal, compared as the widest
    integers both views allow (int64 compares about 7x faster than uint8)."""
    a, b = _bytes(a), _bytes(b)
    for word in (torch.int64, torch.int32, torch.int16):
        if a.numel() % word.itemsize == 0:
            try:
                return torch.equal(a.view(word), b.view(word))
            except RuntimeError:  # a storage offset not aligned to the word
                continue
    return torch.equal(a, b)


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    diff = (a.detach().double() - b.detach().double()).abs()
    both_nan = (
        a.isnan() & b.isnan() if a.is_floating_point() else torch.zeros_like(diff, dtype=torch.bool)
    )
    diff = torch.where(both_nan, torch.zeros_like(diff), diff)
    value = diff.nan_to_num(nan=math.inf).max().item()
    return float(value)


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner unpickles non-tensor entries with weights_only=False; refuse any
    entry that a weights_only=True load rejects before handing it to the default path."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        torch.load(value, weights_only=True)
        value.seek(0)
        super().load_bytes(read_item, value)


# Entries read back together by one dcp.load call (its fixed cost is paid per batch, not per
# entry); memory stays bounded by max(this, the largest entry).
READ_BATCH_BYTES = 256 * 2**20


def checkpoint_entries(path: str, safetensors: bool = False) -> Iterator[tuple[str, Any]]:
    """Read a DCP checkpoint (``safetensors``: one written by HuggingFaceStorageWriter) back in
    this one process (no process group), with the whole value of each entry, a batch of entries
    at a time. An entry that cannot be read yields the exception instead of its value (a failing
    batch is read again entry by entry to say which)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.HuggingFaceStorageReader(path) if safetensors else dcp.FileSystemReader(path)
    metadata = reader.read_metadata()

    def empty(meta):
        if isinstance(meta, TensorStorageMetadata):
            return torch.empty(meta.size, dtype=meta.properties.dtype)
        return None

    def read(names: list[str]) -> dict[str, Any]:
        holder = {n: empty(metadata.state_dict_metadata[n]) for n in names}
        dcp.load(holder, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
        return holder

    for batch in _batches(metadata.state_dict_metadata):
        try:
            yield from read(batch).items()
        except (Exception, CheckpointException):
            for name in batch:
                try:
                    yield name, read([name])[name]
                except (Exception, CheckpointException) as exc:
                    yield name, exc


def _batches(entries: Mapping) -> Iterator[list[str]]:
    batch, size = [], 0
    for name, meta in sorted(entries.items()):
        nbytes = meta.size.numel() * meta.properties.dtype.itemsize if hasattr(meta, "size") else 0
        if batch and size + nbytes > READ_BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(name)
        size += nbytes
    if batch:
        yield batch


def file_entries(path: str) -> Iterator[tuple[str, Any]]:
    """The entries of a full state dict written with torch.save, in name order."""
    flat = flatten(torch.load(path, mmap=True, weights_only=True))
    for name in sorted(flat):
        yield name, flat[name]
