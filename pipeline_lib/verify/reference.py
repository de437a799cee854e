"""The saver's reference: the saver's live state written by every rank in parallel, each rank
its own parts of each entry with their global positions (no gather), read back memory-mapped,
and compared with the part of an entry a reader holds wherever the two overlap: boxes (DTensor
shards, whole tensors) and runs of elements (FSDP1's flat shards). Imports torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor

from pipeline_lib.common.atomic import write_with
from pipeline_lib.verify.bitwise import EntryComparison, ParamNames, compare, merge
from pipeline_lib.verify.entries import FlatPiece


@dataclass(frozen=True)
class Part:
    """A part of a tensor entry: a box at global ``offsets`` of ``data``'s shape, or (``flat``)
    a run of the entry's elements in row-major order starting at ``offsets[0]``."""

    offsets: tuple[int, ...]
    data: torch.Tensor
    flat: bool = False

    @property
    def key(self) -> tuple:
        """Where the part lies: equal keys, equal positions (replicas of one part)."""
        return self.offsets, tuple(self.data.shape), self.flat

    def run(self, shape) -> tuple[int, int] | None:
        """(first, end) element of the part in the entry's row-major order when the part is one
        run of elements (a flat part; a box whose dims after its first partial one are whole),
        else None."""
        if self.flat:
            return self.offsets[0], self.offsets[0] + self.data.numel()
        sizes, strides = list(self.data.shape), _strides(shape)
        start = sum(o * s for o, s in zip(self.offsets, strides, strict=True))
        if self.data.numel() == 0:
            return start, start
        for k in range(max(len(sizes), 1)):
            if all(n == 1 for n in sizes[:k]) and sizes[k + 1 :] == list(shape)[k + 1 :]:
                return start, start + self.data.numel()
        return None

    def indices(self, shape) -> torch.Tensor:
        """The row-major element index in the entry of each element of the part (int64, in the
        part's own row-major order)."""
        if self.flat:
            return torch.arange(self.offsets[0], self.offsets[0] + self.data.numel())
        index = torch.zeros((), dtype=torch.int64)
        for dim, (o, n, s) in enumerate(
            zip(self.offsets, self.data.shape, _strides(shape), strict=True)
        ):
            view = [1] * self.data.dim()
            view[dim] = n
            index = index + (torch.arange(o, o + n) * s).reshape(view)
        return index.reshape(-1)


def _strides(shape) -> list[int]:
    strides, step = [], 1
    for size in reversed(list(shape)):
        strides.append(step)
        step *= size
    return strides[::-1]


def local_piece(value: Any) -> Part | None:
    """This rank's part of a tensor entry, on CPU; None for a non-tensor. A DTensor's offsets
    are the ones DCP itself writes (its chunk list)."""
    if isinstance(value, FlatPiece):
        return Part((value.start,), value.data.detach().cpu(), flat=True)
    if isinstance(value, DTensor):
        (chunk,) = value.__create_chunk_list__()
        return Part(tuple(chunk.offsets), value.to_local().detach().cpu())
    if isinstance(value, ShardedTensor):  # FSDP1 without a device mesh: one shard, or none
        return _sharded_tensor_piece(value)
    if isinstance(value, torch.Tensor):
        if type(value) is not torch.Tensor:
            raise TypeError(f"unsupported sharded tensor type {type(value).__name__}")
        return Part((0,) * value.dim(), value.detach().cpu())
    return None


def _sharded_tensor_piece(value: ShardedTensor) -> Part:
    """A ShardedTensor's one local shard at its offsets (its metadata's, which DCP writes); a
    rank with no shard of it holds an empty box at the origin."""
    shards = value.local_shards()
    if len(shards) > 1:
        raise TypeError(f"a ShardedTensor with {len(shards)} local shards")
    if not shards:
        empty = torch.empty((0, *value.size()[1:]), dtype=value.dtype)
        return Part((0,) * len(value.size()), empty)
    (shard,) = shards
    return Part(tuple(shard.metadata.shard_offsets), shard.tensor.detach().cpu())


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a compact copy when it views a larger storage (an FSDP flat parameter):
    torch.save writes a view's whole storage."""
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.contiguous().clone()


def _owned(parts: dict[str, Part], rank: int) -> set[str]:
    """The entries whose part this rank writes: one copy of every part, by the lowest rank
    holding it (replicas of DDP, HSDP, TP and FSDP2+TP, 0-dim state on every FSDP1 rank). One
    all_gather of the parts' positions when a process group is up."""
    import torch.distributed as dist

    mine = {(name, part.key) for name, part in parts.items()}
    if not dist.is_initialized():
        return set(parts)
    every_rank = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, mine)
    lower = set().union(*every_rank[:rank])
    return {name for name, key in mine if (name, key) not in lower}


def _meta(value: Any) -> dict:
    if isinstance(value, (torch.Tensor, FlatPiece)):
        return {"dtype": value.dtype, "shape": list(value.shape)}
    return {"value": value}


class Reference:
    """The saver's state, written by every rank in parallel: each rank's file holds its own
    part of each entry (one copy of replicas: the lowest rank holding a part writes it) with
    its global position, and the dtype, shape or value of every entry it holds. Read back
    memory-mapped; an entry's parts are compared where they overlap the part a reader holds
    (``compare``), whether boxes (DTensor shards, whole tensors) or runs of elements (FSDP1's
    flat shards)."""

    def __init__(self, directory: str, form: str | None = None):
        """``form``: a reference of the same state in another form (``load_form_dir``): its
        entries replace this one's, parts it does not hold are read from ``directory``."""
        self.meta: dict[str, dict] = {}
        self.pieces: dict[str, list[Part]] = {}
        for path in sorted(Path(directory).glob("rank-*.pt"), key=_rank_order):
            part = torch.load(path, mmap=True, weights_only=True)
            self._add_meta(part["meta"])
            for name, (offsets, data, flat) in part["pieces"].items():
                pieces = self.pieces.setdefault(name, [])
                piece = Part(tuple(offsets), data, flat)
                if all(p.key != piece.key for p in pieces):
                    pieces.append(piece)
        if not self.meta:
            raise FileNotFoundError(f"no saver's reference in {directory}")
        if form is not None:
            other = Reference(form)
            self.meta = other.meta
            self.pieces = {n: other.pieces.get(n) or self.pieces.get(n, []) for n in self.meta}

    def _add_meta(self, meta: dict) -> None:
        """One rank's entries: a list value another rank holds otherwise is a part (pipeline
        stages: each stage's optimizer param group names its own parameters); the entry's
        value is the union of the parts, in rank order. Any other value: the last rank's."""
        for name, found in meta.items():
            known = self.meta.get(name, {}).get("value")
            value = found.get("value")
            if isinstance(known, list) and isinstance(value, list) and known != value:
                union = known + [v for v in value if v not in known]
                found = {"value": union}
            self.meta[name] = found

    @staticmethod
    def write(directory: str, flat: dict[str, Any], rank: int, beside: dict | None = None) -> None:
        """This rank's file of the reference of ``flat`` (a flattened state). Collective: the
        ranks agree which of them writes each replicated part. ``beside``: the state of the
        reference this one is another form of (``load_form_dir``): the parts of entries of
        the same name are left to it."""
        parts = {
            n: p
            for n, v in flat.items()
            if n not in (beside or {}) and (p := local_piece(v)) is not None
        }
        owned = _owned(parts, rank)
        pieces = {
            name: (list(part.offsets), _own_storage(part.data), part.flat)
            for name, part in parts.items()
            if name in owned
        }
        meta = {name: _meta(value) for name, value in flat.items()}
        Path(directory).mkdir(parents=True, exist_ok=True)
        target = f"{directory}/rank-{rank}.pt"
        # No CRC32 per record (512 MB: 0.35 -> 0.14 s, one run): a changed byte fails the
        # comparison anyway. Only for this file: DCP's own torch.save calls keep theirs.
        crc32 = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            write_with(target, lambda tmp: torch.save({"meta": meta, "pieces": pieces}, tmp))
        finally:
            torch.serialization.set_crc32_options(crc32)

    def __contains__(self, name: str) -> bool:
        return name in self.meta

    def __iter__(self):
        return iter(self.meta)

    def whole(self, name: str) -> Any:
        """The whole value of an entry (tests and small entries: assembles every part)."""
        meta = self.meta[name]
        if "value" in meta:
            return meta["value"]
        whole = torch.empty(meta["shape"], dtype=meta["dtype"])
        for part in self.pieces.get(name, []):
            if part.flat:
                start = part.offsets[0]
                whole.view(-1)[start : start + part.data.numel()] = part.data
            else:
                whole[_box(part.offsets, part.data.shape)] = part.data
        return whole

    def compare(self, name: str, actual: Any, part: bool = False) -> EntryComparison:
        """The saver's entry ``name`` vs ``actual``, this rank's part of it (a DTensor's local
        shard, a FlatPiece, a plain tensor or value whole): global type, dtype and shape, then
        bit for bit where each saved part overlaps this rank's. ``part``: this rank holds a
        part of each list entry (a pipeline stage: ``compare_list_part``). No collective."""
        meta, mine = self.meta[name], local_piece(actual)
        if part and isinstance(meta.get("value"), list) and isinstance(actual, list):
            return compare_list_part(meta["value"], actual)
        if "value" in meta:
            # A tensor where a value was saved compares as a stand-in (no data needed).
            return compare(meta["value"], actual if mine is None else _stand_in(actual))
        expected = torch.empty(meta["shape"], dtype=meta["dtype"], device="meta")
        if mine is None or (expected.dtype, expected.shape) != (actual.dtype, actual.shape):
            # Global type, dtype and shape first: overlapping other shapes compares wrong parts.
            return compare(expected, actual if mine is None else _stand_in(actual))
        return self.compare_part(name, mine)

    def compare_many(
        self, actual: dict[str, Any], part: bool = False
    ) -> dict[str, EntryComparison]:
        """``compare`` of every entry of ``actual`` (name -> this rank's part)."""
        return {name: self.compare(name, value, part) for name, value in actual.items()}

    def compare_part(self, name: str, mine: Part) -> EntryComparison:
        """The saver's tensor entry ``name`` vs ``mine``, a part of it of the right dtype, bit
        for bit where each saved part overlaps it; not equal unless they cover it."""
        shape = self.meta[name]["shape"]
        result = compare_overlaps(shape, mine, self.pieces.get(name, []))
        if result is None:
            return EntryComparison(False, None, "the saver's reference lacks part of this entry")
        return result


def compare_overlaps(
    shape, mine: Part, saved: list[Part], saved_first: bool = True
) -> EntryComparison | None:
    """``mine`` vs the ``saved`` parts of an entry of ``shape``, bit for bit wherever they
    overlap; None when the saved parts do not cover ``mine``. ``saved_first``: notes name the
    saved side's dtype or shape first."""
    result, covered = EntryComparison(True, 0.0), 0
    for part in saved:
        overlap = _overlap_values(shape, mine, part)
        if overlap is not None:
            covered += overlap[0].numel()
            pair = (overlap[1], overlap[0]) if saved_first else overlap
            result = merge([result, compare(*pair)])
    return result if covered == mine.data.numel() else None


def compare_list_part(union: list, actual: list) -> EntryComparison:
    """A rank's part of a list entry the saver's ranks held parts of: items of the union, in
    its order (whether the parts cover the union is checks.against_reference's); a loader's
    ParamNames (compare.ParamNames) in any order."""
    unique = len(set(actual)) == len(actual)
    if isinstance(actual, ParamNames) and set(actual) <= set(union) and unique:
        return EntryComparison(True, None)
    if actual == union or (
        [v for v in union if v in actual] == actual and len(set(actual)) == len(actual)
    ):
        return EntryComparison(True, None)
    outside = [v for v in actual if v not in union]
    why = f"{outside[0]!r} is in no saver's part" if outside else "not in the saver's order"
    return EntryComparison(False, None, f"list part {actual!r}: {why}")


def _rank_order(path: Path) -> int:
    return int(path.stem.removeprefix("rank-"))


def load_form_dir(directory: str) -> str:
    """The saver's reference of the entries the loader names otherwise (a load_mode whose
    optimizer state is flattened on one side only), beside the reference of ``directory``."""
    return f"{directory}/load-form"


def _stand_in(t) -> torch.Tensor:
    """A tensor of ``t``'s global dtype and shape without data: compare() tells such apart
    before it reads data."""
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def _box(corner, sizes, origin=None) -> tuple[slice, ...]:
    """Index of the box at ``corner`` of ``sizes``, in a piece whose own corner is ``origin``."""
    origin = origin or [0] * len(corner)
    return tuple(slice(c - o, c - o + s) for c, s, o in zip(corner, sizes, origin, strict=True))


def _overlap(offsets_a, sizes_a, offsets_b, sizes_b) -> tuple[list[int], list[int]] | None:
    """(corner, sizes) of where two boxes of one tensor overlap; None when they don't (an empty
    box overlaps nothing; 0-dim boxes always overlap)."""
    lo = [max(a, b) for a, b in zip(offsets_a, offsets_b, strict=True)]
    hi = [
        min(a + s, b + t) for a, s, b, t in zip(offsets_a, sizes_a, offsets_b, sizes_b, strict=True)
    ]
    sizes = [h - low for low, h in zip(lo, hi, strict=True)]
    if any(s <= 0 for s in sizes):
        return None
    return lo, sizes


def _overlap_values(shape, mine: Part, saved: Part):
    """(mine, saved): the elements of two parts of one entry of ``shape`` where they overlap,
    in one order; None where they do not overlap. Boxes overlap as boxes; a run of elements
    meets a run by its ends and anything else element by element (its row-major indices)."""
    if not mine.flat and not saved.flat:
        overlap = _overlap(mine.offsets, mine.data.shape, saved.offsets, saved.data.shape)
        if overlap is None:
            return None
        lo, sizes = overlap
        return mine.data[_box(lo, sizes, mine.offsets)], saved.data[_box(lo, sizes, saved.offsets)]
    a, b = mine.run(shape), saved.run(shape)
    if a and b:
        lo, hi = max(a[0], b[0]), min(a[1], b[1])
        if hi <= lo:
            return None
        mine_values, saved_values = mine.data.reshape(-1), saved.data.reshape(-1)
        return mine_values[lo - a[0] : hi - a[0]], saved_values[lo - b[0] : hi - b[0]]
    if a:  # this rank's part is a run, the saved one a box that is not
        index = saved.indices(shape)
        inside = (index >= a[0]) & (index < a[1])
        if not inside.any():
            return None
        return mine.data.reshape(-1)[index[inside] - a[0]], saved.data.reshape(-1)[inside]
    index = mine.indices(shape)
    inside = (index >= b[0]) & (index < b[1])
    if not inside.any():
        return None
    return mine.data.reshape(-1)[inside], saved.data.reshape(-1)[index[inside] - b[0]]
