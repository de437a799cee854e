"""Read a checkpoint back in one process, without a process group (as a process that did not
write it does): DCP checkpoints (FileSystemWriter or HuggingFaceStorageWriter) and torch.save
full state dicts, entry by entry in batches, in byte-balanced shares. Imports torch."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.distributed.checkpoint import CheckpointException

from pipeline_lib.verify.entries import flatten

# Entries read back together by one dcp.load call (its fixed cost is paid per batch, not per
# entry); memory stays bounded by max(this, the largest entry).
READ_BATCH_BYTES = 32 * 2**20


def checkpoint_entries(
    path: str,
    safetensors: bool = False,
    share: tuple[int, int] = (0, 1),
    skip: Callable[[str], bool] = lambda name: False,
) -> Iterator[tuple[str, Any]]:
    """Read a DCP checkpoint (``safetensors``: one written by HuggingFaceStorageWriter) back in
    this one process (no process group), with the whole value of each entry, a batch of entries
    at a time; ``share`` (i, n): only the i-th of n shares of the entries (``shares``); ``skip``:
    entries of the share the caller deals with otherwise (called once per entry, before any
    read: check 1 compares them on the files' mapped pages, pipeline_lib.verify.checks). An entry
    that cannot be read yields the exception instead of its value: first, unread, those the
    files cannot hold as ``.metadata`` declares them (untrusted.entry_errors: what a read
    allocates is bounded by the files' sizes); then a failing batch is read again in halves to
    say which entries fail. ``.metadata`` is unpickled once."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from pipeline_lib.verify.untrusted import SafeFileSystemReader, SafeLoadPlanner, entry_errors

    reader = dcp.HuggingFaceStorageReader(path) if safetensors else SafeFileSystemReader(path)
    metadata = reader.read_metadata()

    def empty(meta):
        if isinstance(meta, TensorStorageMetadata):
            return torch.empty(meta.size, dtype=meta.properties.dtype)
        return None

    def read(names: list[str]) -> dict[str, Any]:
        holder = {n: empty(metadata.state_dict_metadata[n]) for n in names}
        dcp.load(holder, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
        return holder

    sizes = _entry_bytes(metadata)
    unfit = {} if safetensors else entry_errors(metadata, path)
    mine = [name for name in shares(sizes, share[1])[share[0]] if not skip(name)]
    yield from ((name, unfit[name]) for name in mine if name in unfit)
    for batch in _batches([name for name in mine if name not in unfit], sizes):
        yield from _read_or_split(batch, read)


def _entry_bytes(metadata) -> dict[str, int]:
    """Each entry's bytes: a tensor's as declared, a non-tensor entry's stored bytes (DCP reads
    them whole), so that a batch holds at most READ_BATCH_BYTES of either."""
    stored: dict[str, int] = {}
    for index, info in (getattr(metadata, "storage_data", None) or {}).items():
        stored[index.fqn] = stored.get(index.fqn, 0) + max(getattr(info, "length", 0), 0)
    return {
        name: meta.size.numel() * meta.properties.dtype.itemsize
        if hasattr(meta, "size")
        else stored.get(name, 0)
        for name, meta in metadata.state_dict_metadata.items()
    }


def _read_or_split(
    names: list[str], read: Callable[[list[str]], dict[str, Any]]
) -> Iterator[tuple[str, Any]]:
    """The entries of ``names`` read together, or, when that fails, each half read the same way,
    down to one entry, which yields its exception: the first failing entry of n is found in
    about 2 log2(n) reads (one read per entry took as many reads as entries before it)."""
    try:
        yield from read(names).items()
    except (Exception, CheckpointException) as exc:
        if len(names) == 1:
            yield names[0], exc
            return
        middle = len(names) // 2
        yield from _read_or_split(names[:middle], read)
        yield from _read_or_split(names[middle:], read)


def shares(sizes: Mapping[str, int], count: int) -> list[list[str]]:
    """Entries (name -> bytes) dealt into ``count`` shares of about equal bytes, each in name
    order; the same on every rank (largest first, each to the lightest share)."""
    dealt: list[list[str]] = [[] for _ in range(count)]
    loads = [0] * count
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        lightest = loads.index(min(loads))
        dealt[lightest].append(name)
        loads[lightest] += sizes[name]
    return [sorted(names) for names in dealt]


def _batches(names: list[str], sizes: Mapping[str, int]) -> Iterator[list[str]]:
    batch, size = [], 0
    for name in names:
        if batch and size + sizes[name] > READ_BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(name)
        size += sizes[name]
    if batch:
        yield batch


def file_entries(path: str, share: tuple[int, int] = (0, 1)) -> Iterator[tuple[str, Any]]:
    """The entries of a full state dict written with torch.save (memory-mapped), in name order;
    ``share`` as for checkpoint_entries."""
    flat = flatten(torch.load(path, mmap=True, weights_only=True))
    sizes = {n: v.nbytes if isinstance(v, torch.Tensor) else 0 for n, v in flat.items()}
    for name in shares(sizes, share[1])[share[0]]:
        yield name, flat[name]
