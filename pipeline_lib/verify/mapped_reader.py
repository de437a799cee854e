"""Read a DCP folder's tensor chunks in place: memory-mapped, never copied. A checks' reader
(pipeline_lib.verify.sealed_mode, pipeline_lib.verify.checks), independent of DCP's load path: no
planner, no ``dcp.load``, no ``FileSystemReader.read_data``.

``FileSystemWriter`` (torch's default ``TORCH_SAVE`` serialization) writes each chunk of a
tensor as one ``torch.save`` archive, a zip file, at ``(relative_path, offset, length)`` of the
metadata's ``storage_data``. ``chunk_part`` finds the archive's one data record with the
standard ``zipfile`` module, reads the tensor's dtype, size, strides and storage offset with
``torch.load(map_location="meta", weights_only=True)`` (no data read, no code run), and maps
the record's bytes read-only: a ``reference.Part`` whose data are the file's pages.

It maps only the plain case and says None otherwise (the caller reads that chunk with DCP, as
before): a chunk with transforms (DCP extensions), a compressed or several data records, a
byte order other than this machine's, a record whose size is not its storage's, a tensor
whose dtype or size differs from the metadata's, a path outside the folder. Any error while
mapping is None too: DCP's path then says what is wrong with the file.

A mapped part's pages count in the process's resident memory while it is open: the caller
holds one entry's chunks at a time (``open_parts``), so the pages a check touches stay bounded
by the largest entry this rank compares.
"""

from __future__ import annotations

import io
import math
import mmap
import struct
import sys
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

from pipeline_lib.verify.reference import Part

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... file name length, extra field length


class _Slice(io.RawIOBase):
    """A read-only file object over ``[offset, offset + length)`` of an open file."""

    def __init__(self, file, offset: int, length: int):
        self.file, self.offset, self.length, self.position = file, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, position: int, whence: int = 0) -> int:
        self.position = {0: 0, 1: self.position, 2: self.length}[whence] + position
        return self.position

    def readinto(self, buffer) -> int:
        wanted = max(0, min(len(buffer), self.length - self.position))
        self.file.seek(self.offset + self.position)
        count = self.file.readinto(memoryview(buffer)[:wanted])
        self.position += count
        return count


def _record(file, offset: int, length: int) -> tuple[torch.Tensor, int, int] | None:
    """(the archive's tensor on the meta device, where its data record's bytes start in the
    file, their count), or None when the archive is not the plain case."""
    archive = io.BufferedReader(_Slice(file, offset, length))
    with zipfile.ZipFile(archive) as zipped:
        records = zipfile_names(zipped)
        data = [i for i in records.values() if "/data/" in i.filename]
        order = next((n for n in records if n.endswith("/byteorder")), None)
        if len(data) != 1 or data[0].compress_type != zipfile.ZIP_STORED:
            return None
        if order is not None and zipped.read(order).decode() != sys.byteorder:
            return None
    archive.seek(0)
    meta = torch.load(archive, map_location="meta", weights_only=True)
    if type(meta) is not torch.Tensor or data[0].file_size != meta.untyped_storage().nbytes():
        return None
    file.seek(offset + data[0].header_offset)
    signature, name, extra = _LOCAL_HEADER.unpack(file.read(_LOCAL_HEADER.size))
    if signature != b"PK\x03\x04":
        return None
    start = offset + data[0].header_offset + _LOCAL_HEADER.size + name + extra
    return meta, start, data[0].file_size


def zipfile_names(zipped: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """The archive's records by name (a name twice: not the plain case, nothing returned)."""
    infos = zipped.infolist()
    named = {i.filename: i for i in infos}
    return named if len(named) == len(infos) else {}


@contextmanager
def chunk_part(folder: str, metadata, name: str, chunk) -> Iterator[Part | None]:
    """The chunk ``chunk`` of tensor entry ``name`` of the DCP folder ``folder`` (its
    ``metadata``) as a Part whose data are the file's mapped pages, open inside the block;
    None when it is not the plain case (module docstring)."""
    entry = metadata.state_dict_metadata[name]
    info = metadata.storage_data.get(MetadataIndex(name, chunk.offsets))
    root = Path(folder).resolve()
    path = (root / info.relative_path).resolve() if info is not None else None
    if info is None or getattr(info, "transform_descriptors", None) or root not in path.parents:
        yield None
        return
    with ExitStack() as stack:
        try:
            file = stack.enter_context(open(path, "rb"))
            found = _record(file, info.offset, info.length)
            if found is None:
                raise LookupError("not the plain case")
            meta, start, size = found
            if (meta.dtype, meta.shape) != (entry.properties.dtype, chunk.sizes):
                raise LookupError("not the metadata's dtype or size")
            base = start - start % mmap.ALLOCATIONGRANULARITY
            pages = mmap.mmap(
                file.fileno(), start + size - base, offset=base, access=mmap.ACCESS_READ
            )
            stack.callback(_close, pages)
            data = _view(pages, start - base, meta)
        except (Exception, zipfile.BadZipFile):
            data = None
        if data is None:
            yield None
            return
        try:
            yield Part(tuple(chunk.offsets), data)
        finally:
            del data  # the view exports the mapping's buffer: gone before it closes


def _close(pages: mmap.mmap) -> None:
    """Unmap now, or (a view of it still alive somewhere) when the last view is gone."""
    with suppress(BufferError):
        pages.close()


def _view(pages: mmap.mmap, start: int, meta: torch.Tensor) -> torch.Tensor:
    """The meta tensor's dtype, size, strides and storage offset over the mapped bytes."""
    nbytes = meta.untyped_storage().nbytes()
    if nbytes == 0:
        return torch.empty(meta.shape, dtype=meta.dtype)
    with warnings.catch_warnings():  # a read-only mapping: the part is only ever read
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(pages, dtype=torch.uint8, count=nbytes, offset=start)
    return raw.view(meta.dtype).as_strided(meta.shape, meta.stride(), meta.storage_offset())


@contextmanager
def open_parts(folder: str, metadata, name: str) -> Iterator[list[Part] | None]:
    """Every chunk of tensor entry ``name`` as a mapped Part, open inside the block; None when
    one of them is not the plain case, or the chunks do not tile the entry (each element in
    exactly one chunk: DCP's read of such an entry is the judge then)."""
    entry = metadata.state_dict_metadata[name]
    if not isinstance(entry, TensorStorageMetadata) or not tiles(entry):
        yield None
        return
    with ExitStack() as stack:
        parts = [stack.enter_context(chunk_part(folder, metadata, name, c)) for c in entry.chunks]
        yield None if any(p is None for p in parts) else parts
        del parts


def tiles(entry: TensorStorageMetadata) -> bool:
    """The entry's chunks lie inside it, do not overlap, and their elements add up to its."""
    boxes = [(tuple(c.offsets), tuple(c.sizes)) for c in entry.chunks]
    size = tuple(entry.size)
    for offsets, sizes in boxes:
        if len(offsets) != len(size) or any(
            o < 0 or s < 0 or o + s > n for o, s, n in zip(offsets, sizes, size, strict=True)
        ):
            return False
    for i, (a, s) in enumerate(boxes):
        for b, t in boxes[:i]:
            if all(max(x, y) < min(x + m, y + n) for x, m, y, n in zip(a, s, b, t, strict=True)):
                return False
    return sum(math.prod(s) for _, s in boxes) == math.prod(size)
