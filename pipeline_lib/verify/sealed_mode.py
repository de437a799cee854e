"""Sealed mode (``verify.reference: sealed``, docs: verification.md): the checkpoint's files are
the reference. ``Files`` reads, in one process without a process group, the part of each entry
that a rank holds (DCP's public reader and a ``dcp.load`` into fresh tensors, never the saver's
state-dict path) and compares it bit for bit; the save job compares its live objects with the
files (``files_vs_live``) and seals them, a load job checks the seal and compares its state with
the files (pipeline_lib.verify.checks). Imports torch.

Public but not in torch's documented index: ``planner_helpers.create_read_items_for_chunk_list``
(the read items of a box of an entry, the function DCP's own load plan uses for a DTensor).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import CheckpointException, LoadPlan
from torch.distributed.checkpoint.default_planner import create_default_local_load_plan
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from pipeline_lib.common.errors import Incompatible, one_line
from pipeline_lib.verify import mapped_reader, seal_file
from pipeline_lib.verify.bitwise import EntryComparison, merge, unmatched
from pipeline_lib.verify.bitwise import compare as _compare
from pipeline_lib.verify.entries import flatten
from pipeline_lib.verify.readers import READ_BATCH_BYTES
from pipeline_lib.verify.reference import Part, _owned, compare_overlaps, local_piece
from pipeline_lib.verify.untrusted import SafeFileSystemReader, SafeLoadPlanner

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes) of a part of an entry


class _BoxPlanner(SafeLoadPlanner):
    """A load plan that reads, of each tensor entry in ``boxes``, only that box (into a fresh
    tensor of the box's shape); other entries whole. Counts the elements the checkpoint's chunks
    cover in each box (``covered``): a box they do not cover is not read whole."""

    def __init__(self, boxes: dict[str, Box]):
        super().__init__()
        self.boxes, self.covered = boxes, dict.fromkeys(boxes, 0)

    def create_local_plan(self) -> LoadPlan:
        requests = []
        for name, value in self.state_dict.items():
            meta = self.metadata.state_dict_metadata[name]  # KeyError: not in the checkpoint
            if name in self.boxes and isinstance(meta, TensorStorageMetadata):
                offsets, sizes = self.boxes[name]
                chunk = ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))
                items = create_read_items_for_chunk_list(name, meta, [chunk])
                self.covered[name] = sum(math.prod(i.lengths) for i in items)
                requests += items
            else:  # a value, or a tensor read whole: DCP's default plan of that entry
                requests += create_default_local_load_plan({name: value}, self.metadata).items
        self.plan = LoadPlan(requests)
        return self.plan

    def lookup_tensor(self, index):
        """The fresh tensor of an entry (of its box: read items' offsets are box-relative)."""
        return self.state_dict[index.fqn]


def _box(part: Part, shape) -> Box:
    """The smallest box of whole rows holding ``part`` (a box itself, or a run of elements)."""
    if not part.flat:
        return part.offsets, tuple(part.data.shape)
    if len(shape) == 0:
        return (), ()
    row = math.prod(shape[1:])
    first, end = part.offsets[0], part.offsets[0] + part.data.numel()
    lo, hi = first // max(row, 1), -(-end // max(row, 1))
    return (lo, *[0] * (len(shape) - 1)), (hi - lo, *shape[1:])


def _in_box(part: Part, shape, read: torch.Tensor) -> torch.Tensor:
    """The elements of ``read`` (the box ``_box`` gave) at ``part``'s places, in its shape."""
    if not part.flat or len(shape) == 0:
        return read.reshape(part.data.shape)
    start = part.offsets[0] - _box(part, shape)[0][0] * math.prod(shape[1:])
    return read.reshape(-1)[start : start + part.data.numel()]


class Files:
    """A checkpoint's files as the reference of the parts of entries a rank holds: a DCP folder
    (``safetensors``: one HuggingFaceStorageWriter wrote) or a full state dict that torch.save
    wrote (``full``, memory-mapped)."""

    def __init__(self, path: str, safetensors: bool = False, full: bool = False):
        import torch.distributed.checkpoint as dcp

        self.path, self.full = path, full
        # keep: the parts read are kept for the next compare_many of the same parts (check 2
        # compares two states of one loader: one read of the files, at one shard's memory).
        self.keep, self._kept = False, {}
        # FileSystemWriter's folder: tensor parts compared on its mapped pages (pipeline_lib.
        # mapped) where they are the plain case; dcp.load reads the rest. A full-state file is
        # memory-mapped whole by torch.load.
        self.mappable = not (safetensors or full)
        if full:
            self.whole = flatten(torch.load(path, mmap=True, weights_only=True))
            self.meta = dict(self.whole)
            return
        self.reader = (
            dcp.HuggingFaceStorageReader(path) if safetensors else SafeFileSystemReader(path)
        )
        self.metadata = self.reader.read_metadata()
        self.meta = self.metadata.state_dict_metadata

    def __contains__(self, name: str) -> bool:
        return name in self.meta

    def __iter__(self):
        return iter(self.meta)

    def _expected(self, name: str) -> Any:
        """The entry's global dtype and shape (a tensor without data), or None for a value."""
        meta = self.meta[name]
        if isinstance(meta, torch.Tensor):
            return torch.empty(meta.shape, dtype=meta.dtype, device="meta")
        if isinstance(meta, TensorStorageMetadata):
            return torch.empty(meta.size, dtype=meta.properties.dtype, device="meta")
        return None

    def compare_many(
        self, actual: dict[str, Any], files_first: bool = True
    ) -> dict[str, EntryComparison]:
        """Each entry of ``actual`` (this rank's part of it; every name in the files) vs the files:
        global type, dtype and shape, then bit for bit. Reads a batch of entries per dcp.load;
        an entry that cannot be read is not equal, noted ``unreadable: ...``. ``files_first``:
        notes say the files' dtype, shape or value first (the other side's when False)."""

        def compare(expected, value):
            return _compare(expected, value) if files_first else _compare(value, expected)

        found, wanted = {}, {}
        for name, value in actual.items():
            expected, mine = self._expected(name), local_piece(value)
            if expected is None:  # a value in the files: read whole, compared by value
                wanted[name] = None
            elif mine is None or (expected.dtype, expected.shape) != (value.dtype, value.shape):
                # Global type, dtype and shape first (as Reference.compare).
                found[name] = compare(expected, value if mine is None else _stand_in(value))
            else:
                wanted[name] = mine
        for name in [n for n, mine in wanted.items() if mine is not None and self.mappable]:
            mapped_result = self._compare_mapped(name, wanted[name], files_first)
            if mapped_result is not None:
                found[name] = mapped_result
                del wanted[name]
        kept, parts = {}, dict(wanted)
        for name, mine in parts.items():
            key = None if mine is None else (name, _box(mine, self._expected(name).shape))
            if key in self._kept:
                kept[name] = self._kept.pop(key)
                del wanted[name]
        for name, read in itertools.chain(kept.items(), self._read(wanted)):
            mine, value = parts[name], actual[name]
            if self.keep and mine is not None and not isinstance(read, BaseException):
                self._kept[name, _box(mine, self._expected(name).shape)] = read
            if isinstance(read, BaseException):
                found[name] = EntryComparison(False, None, f"unreadable: {one_line(read)}")
            elif mine is None:
                mine = local_piece(value)
                found[name] = compare(read, value if mine is None else _stand_in(value))
            else:
                found[name] = compare(_in_box(mine, self._expected(name).shape, read), mine.data)
        return found

    def _compare_mapped(self, name: str, mine: Part, files_first: bool) -> EntryComparison | None:
        """``mine`` vs the entry's chunks on the files' mapped pages; None where a chunk is not
        the plain case (DCP reads the entry then)."""
        with mapped_reader.open_parts(self.path, self.metadata, name) as chunks:
            if chunks is None:
                return None
            return compare_overlaps(self._expected(name).shape, mine, chunks, files_first)

    def _read(self, wanted: dict[str, Part | None]) -> Iterator[tuple[str, Any]]:
        """(name, the box of the part or the whole value, or the exception reading it)."""
        if self.full:
            for name, mine in wanted.items():
                whole = self.whole[name]
                if mine is None:
                    yield name, whole
                    continue
                offsets, sizes = _box(mine, whole.shape)
                yield (
                    name,
                    whole[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))],
                )
            return
        batch, size = [], 0
        for name, mine in wanted.items():
            batch.append(name)
            size += 0 if mine is None else mine.data.nbytes
            if size > READ_BATCH_BYTES:
                yield from self._read_batch(batch, wanted)
                batch, size = [], 0
        if batch:
            yield from self._read_batch(batch, wanted)

    def _read_batch(self, names: list[str], wanted: dict) -> Iterator[tuple[str, Any]]:
        try:
            yield from self._load(names, wanted).items()
        except (Exception, CheckpointException):
            for name in names:  # again entry by entry, to say which cannot be read
                try:
                    yield name, self._load([name], wanted)[name]
                except (Exception, CheckpointException) as exc:
                    yield name, exc

    def _load(self, names: list[str], wanted: dict) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp

        boxes, holder = {}, {}
        for name in names:
            mine, expected = wanted[name], self._expected(name)
            if mine is None:
                holder[name] = None
                continue
            boxes[name] = _box(mine, expected.shape)
            holder[name] = torch.empty(boxes[name][1], dtype=expected.dtype)
        planner = _BoxPlanner(boxes)
        dcp.load(holder, storage_reader=self.reader, planner=planner, no_dist=True)
        for name, (_, sizes) in boxes.items():
            if planner.covered[name] != math.prod(sizes):
                raise ValueError(f"{name}: the checkpoint's chunks do not cover this part")
        return holder


def _stand_in(t) -> torch.Tensor:
    """A tensor of ``t``'s global dtype and shape without data."""
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def sealed_source(item, source) -> bool:
    """A load cell of ``item`` checks ``source`` in sealed mode (an existing checkpoint is always
    its own files' reference, pipeline_lib.job.existing). A load_mode whose loader names entries
    otherwise than the files cannot be compared with them: Incompatible (the cell is ``skip``)."""
    if source.naming is not None or not seal_file.is_sealed(item.spec.verify):
        return False
    if item.variant.forms_differ:
        raise Incompatible(
            f"verify.reference sealed: load_mode {item.variant.load_mode} names the optimizer "
            "state otherwise than the files, which are the reference in sealed mode"
        )
    return True


def files_reference(variant, paths) -> Files:
    """The files a load of ``variant`` reads, as the reference (raises if unreadable)."""
    return _files(variant, paths)


def _files(variant, paths) -> Files:
    path = paths.read_by(variant)
    return Files(path, variant.format.startswith("safetensors"), variant.reads_full_state)


def files_vs_live(variant, paths, live: dict) -> tuple[dict[str, EntryComparison], str]:
    """Check 1 of sealed mode, in the save job before the training goes on: every rank's own
    parts of the saver's live state (one copy of replicas) vs the files, bit for bit, reading
    only those parts. Rank 0 gets the entries' comparisons, or a reason the checkpoint cannot be
    read ({} and "" on other ranks). Collective."""
    rank = dist.get_rank()
    parts = {n: p for n, v in live.items() if (p := local_piece(v)) is not None}
    owned = _owned(parts, rank)
    mine = {n: v for n, v in live.items() if n in owned or (n not in parts and rank == 0)}
    entries, error, names = {}, "", set()
    try:
        files = _files(variant, paths)
        names = set(files)
        present = {n: v for n, v in mine.items() if n in files}
        entries = files.compare_many(present, False)
    except (Exception, CheckpointException) as exc:
        error = f"files vs saver: cannot read checkpoint {paths.read_by(variant)}: {one_line(exc)}"
    every_rank = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object((entries, error, set(live)), every_rank, dst=0)
    if every_rank is None:
        return {}, ""
    if errors := [e for _, e, _ in every_rank if e]:
        return {}, errors[0]
    merged = {}
    for name in sorted({n for part, _, _ in every_rank for n in part}):
        merged[name] = merge([part[name] for part, _, _ in every_rank if name in part])
    # A rank holds no part of some entries (FSDP1's flat shards): the names of every rank's.
    live = set().union(*(held for _, _, held in every_rank))
    for name in sorted(live - names):
        merged[name] = unmatched("missing in the checkpoint")
    for name in sorted(names - set(live)):
        merged[name] = unmatched("not in the saver's state")
    return merged, ""


def sharing_only(live_shared: dict, flat_shared: dict) -> dict[str, EntryComparison]:
    """Check 0 of sealed mode: the entries of the saver's state dict (or its live state) that
    share storage the model does not tie; values are checked by check 1 (files vs live)."""
    return {name: unmatched(note) for name, note in {**live_shared, **flat_shared}.items()}


def check_seal(path: str) -> str:
    """Every rank checks the seal of ``path`` for its share of the files; every rank gets the
    reason of the lowest rank that found one ('' when the seal holds). Collective."""
    part = (dist.get_rank(), dist.get_world_size())
    every_rank = [None] * part[1]
    dist.all_gather_object(every_rank, seal_file.check(path, part))
    return next((reason for reason in every_rank if reason), "")


def write_seal(path: str) -> None:
    """Every rank digests its share of the files of ``path`` as they are now; rank 0 writes the
    seal. Collective."""
    part = (dist.get_rank(), dist.get_world_size())
    mine = seal_file.make(path, part) if Path(path).exists() else seal_file.Seal()
    every_rank = [None] * part[1] if part[0] == 0 else None
    dist.gather_object(mine.files, every_rank, dst=0)
    if every_rank is not None and Path(path).exists():
        seal_file.write(path, seal_file.Seal(files=dict(sorted(
            (name, f) for files in every_rank for name, f in files.items()
        ))))  # fmt: skip
    dist.barrier()
