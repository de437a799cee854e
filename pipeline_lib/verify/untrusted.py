"""Read DCP's ``.metadata`` without running what a pickle asks for.

``FileSystemReader.read_metadata`` is ``pickle.load``: a ``.metadata`` file can name any
callable (``os.system``) and pickle calls it. ``load_metadata`` unpickles with ``find_class``
admitting only what DCP's ``Metadata`` is made of on torch 2.13 (read off real checkpoints with
``pickletools``): the dataclasses of ``torch.distributed.checkpoint.metadata``, the
``_StorageInfo`` of ``filesystem``, ``torch.Size``, the dtype, layout and memory-format
objects of ``torch`` (and torch's ``_get_layout``, by which a layout is pickled), and
``pathlib`` paths (``StorageMeta.checkpoint_id``). Anything else is refused with
``UntrustedPickle`` naming it, before it is called. ``SafeFileSystemReader`` also refuses a
``.metadata`` that places data outside its folder or in anything but a regular file
(``confine``), reads ``.metadata`` only as a regular file inside the folder of at most
``METADATA_MAX_BYTES`` (``metadata_file``), and once per reader. ``entry_errors`` says, before
anything is read, which entries the files cannot hold as ``.metadata`` declares them, so that
what a read allocates is bounded by what the files really hold. Imports torch.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import stat
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata

from pipeline_lib.common.errors import human_bytes, printable

_METADATA = "torch.distributed.checkpoint.metadata"
ALLOWED = {
    _METADATA: {
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}
# torch.<name> that are values, not callables that act: torch.float32, torch.strided, ...
_TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)
# The largest .metadata read (DCP reads it whole). A checkpoint of millions of chunks (thousands
# of entries sharded over hundreds of ranks) has a few hundred MiB.
METADATA_MAX_BYTES = 2**30
# The largest single read of the .metadata unpickler: one object's bytes (a frame of pickle
# protocol 4 is 64 KiB; an entry name, a few hundred bytes). A larger one is refused unread.
PICKLE_READ_MAX_BYTES = 64 * 2**20
# The largest non-tensor entry read (DCP reads one whole into memory, then torch.load reads it):
# a parameter group's values, a step count, a data loader's position are a few KiB.
BYTES_ENTRY_MAX_BYTES = 64 * 2**20
_CHUNK = 2**20  # the block size .metadata is hashed in


class UnsafeFile(ValueError):
    """A file of the checkpoint that is not read: not a regular file inside the folder, or
    larger than what is read of it."""


class UntrustedPickle(pickle.UnpicklingError):
    """A ``.metadata`` pickle names something DCP's metadata is not made of."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_VALUES):
            return getattr(torch, name)
        raise UntrustedPickle(
            f"refused to unpickle {module}.{name}: DCP's metadata is not made of it (a foreign "
            "or tampered .metadata; see docs/untrusted-checkpoints.md)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UntrustedPickle("refused a persistent id: DCP's metadata has none")


class _BoundedStream(io.RawIOBase):
    """``stream`` read by the unpickler, which reads an object's declared length at once: a
    read of more than PICKLE_READ_MAX_BYTES is refused (the unpickler may have reserved the
    declared size; never written, it takes no memory)."""

    def __init__(self, stream: BinaryIO):
        super().__init__()
        self.stream = stream

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        self._bound(size)
        return self.stream.read(size)

    def readinto(self, buffer) -> int:
        self._bound(len(buffer))
        data = self.stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def peek(self, size: int = 0) -> bytes:
        """What the stream holds next, without reading it (the unpickler prefetches with it,
        instead of one read per opcode of a pickle without frames)."""
        peek = getattr(self.stream, "peek", None)
        return peek(min(size, PICKLE_READ_MAX_BYTES)) if peek else b""

    def readline(self, size: int = -1) -> bytes:
        return self.stream.readline(PICKLE_READ_MAX_BYTES if size < 0 else size)

    def _bound(self, size: int) -> None:
        if size < 0 or size > PICKLE_READ_MAX_BYTES:
            raise UntrustedPickle(
                f"refused to read an object of {'unbounded' if size < 0 else human_bytes(size)} "
                f"(more than {human_bytes(PICKLE_READ_MAX_BYTES)}): DCP's metadata has none"
            )


def load_metadata(stream: BinaryIO, where: str = ".metadata"):
    """Unpickle DCP metadata from ``stream``, admitting only ALLOWED and objects of at most
    PICKLE_READ_MAX_BYTES; UntrustedPickle (naming ``where``) otherwise."""
    try:
        return _MetadataUnpickler(_BoundedStream(stream)).load()
    except UntrustedPickle as exc:
        raise UntrustedPickle(f"{where}: {exc}") from None


def metadata_file(folder: str | Path, name: str = ".metadata") -> Path:
    """``folder/name`` (``.metadata``, or a rank's ``__<rank>.metadata``), refused (UnsafeFile)
    unless it is a regular file inside the folder (a link to one in it is fine) of at most
    METADATA_MAX_BYTES: a FIFO or a device would block or never end, a link out of the folder
    reads another file. Opens nothing."""
    path = Path(folder) / name
    regular_file(path, folder, str(path))
    size = path.stat().st_size
    if size > METADATA_MAX_BYTES:
        limit = human_bytes(METADATA_MAX_BYTES)
        raise UnsafeFile(f"{path}: refused: {human_bytes(size)}, more than the {limit} read of one")
    return path


def regular_file(path: Path, folder: str | Path, where: str) -> None:
    """Refuse (UnsafeFile, naming ``where``) a ``path`` that resolves outside ``folder`` or is
    not a regular file (a FIFO, a device, a socket, a folder). A missing file is left to the
    reader that opens it (FileNotFoundError)."""
    resolved = path.resolve()
    if not resolved.is_relative_to(Path(folder).resolve()):
        raise OutsideFolder(
            f"{where}: refused: a link to {printable(str(resolved))!r}, outside the checkpoint's "
            "folder (a foreign or tampered checkpoint; see docs/untrusted-checkpoints.md)"
        )
    try:
        mode = resolved.stat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise UnsafeFile(f"{where}: refused: not a regular file ({_file_kind(mode)})")


def _file_kind(mode: int) -> str:
    kinds = {stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device", stat.S_ISDIR:
             "a folder", stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}  # fmt: skip
    return next((kind for test, kind in kinds.items() if test(mode)), f"mode {mode:o}")


def metadata_sha256(folder: str | Path) -> str:
    """The SHA-256 of ``folder/.metadata`` (metadata_file's checks first), read in blocks."""
    digest = hashlib.sha256()
    with open(metadata_file(folder), "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


class OutsideFolder(ValueError):
    """A ``.metadata`` places an entry's data in a file outside the checkpoint's folder."""


def confine(metadata: Any, folder: str | Path, where: str = ".metadata") -> None:
    """Refuse (OutsideFolder, naming ``where`` and the entry) a ``.metadata`` whose
    ``storage_data`` names a file outside ``folder``: DCP's FileSystemReader opens ``folder /
    relative_path`` as the pickle says (torch 2.13: an absolute path, or one with ``..``,
    reads any file the process can read). Symbolic links are followed. Refuse (UnsafeFile) one
    that names a file that is not a regular file (a FIFO blocks the reader forever), or that
    reads an entry through a stream transform (a decompression: its size is known only once
    read). Each file is looked at once."""
    root = Path(folder).resolve()
    seen: set[str] = set()
    for index, info in (getattr(metadata, "storage_data", None) or {}).items():
        relative = getattr(info, "relative_path", "")
        entry = printable(str(getattr(index, "fqn", index)))
        if getattr(info, "transform_descriptors", None):
            raise UnsafeFile(
                f"{where}: refused: entry {entry} is read through {info.transform_descriptors!r} "
                "(a stream transform: its size is not known before it is read)"
            )
        if relative in seen:
            continue
        seen.add(relative)
        if not (root / relative).resolve().is_relative_to(root):
            raise OutsideFolder(
                f"{where}: refused: entry {entry} is read from {printable(repr(relative))}, "
                "outside the checkpoint's folder (a foreign or tampered .metadata; see "
                "docs/untrusted-checkpoints.md)"
            )
        regular_file(root / relative, root, f"{where}: entry {entry} is read from {relative!r}")


def entry_errors(metadata: Any, folder: str | Path) -> dict[str, Exception]:
    """The entries the files cannot hold as ``.metadata`` declares them, each with why, found
    before anything is read (the files' sizes, from ``stat``): an entry with no data, a chunk
    outside its file, a tensor larger than its chunks' bytes (its buffer would be allocated
    first), a non-tensor entry larger than BYTES_ENTRY_MAX_BYTES (DCP reads it whole). A missing
    file is left to the reader (FileNotFoundError). What a read of the other entries allocates
    is then bounded by the files' sizes."""
    stored, errors = _stored_bytes(metadata, Path(folder))
    for name, meta in metadata.state_dict_metadata.items():
        if name not in errors and (why := _size_error(meta, stored.get(name))):
            errors[name] = UnsafeFile(f"entry {printable(name)}: {why}")
    return errors


def _stored_bytes(metadata: Any, root: Path) -> tuple[dict[str, int], dict[str, Exception]]:
    """(each entry's bytes in the files, the entries with a chunk outside its file)."""
    sizes: dict[str, int | None] = {}
    stored: dict[str, int] = {}
    errors: dict[str, Exception] = {}
    for index, info in (getattr(metadata, "storage_data", None) or {}).items():
        name, relative = index.fqn, info.relative_path
        if relative not in sizes:
            path = root / relative
            sizes[relative] = path.stat().st_size if path.exists() else None
        stored[name] = stored.get(name, 0) + max(info.length, 0)
        end, size = info.offset + info.length, sizes[relative]
        if size is not None and not 0 <= info.offset <= end <= size and name not in errors:
            errors[name] = UnsafeFile(
                f"entry {printable(name)}: stored at bytes {info.offset}..{end} of "
                f"{printable(repr(relative))}, which holds {size} bytes"
            )
    return stored, errors


def _size_error(meta: Any, stored: int | None) -> str | None:
    """Why an entry's data (``stored`` bytes in the files; None: no chunk) cannot be what its
    metadata declares, or None."""
    tensor = isinstance(meta, TensorStorageMetadata)
    declared = meta.size.numel() * meta.properties.dtype.itemsize if tensor else 0
    if stored is None:
        return "no data in the checkpoint's files" if declared or not tensor else None
    if tensor and declared > stored:
        return (
            f"declares {human_bytes(declared)} of tensor data, its chunks in the files hold "
            f"{human_bytes(stored)}"
        )
    if not tensor and stored > BYTES_ENTRY_MAX_BYTES:
        return (
            f"a non-tensor entry of {human_bytes(stored)}, more than the "
            f"{human_bytes(BYTES_ENTRY_MAX_BYTES)} one is read up to"
        )
    return None


class SafeFileSystemReader(FileSystemReader):
    """DCP's FileSystemReader, reading ``.metadata`` (a regular file inside the folder:
    ``metadata_file``) with load_metadata and refusing one that places data outside the folder
    or in other than regular files (``confine``); torch 2.13's read_metadata otherwise: the
    same path, a StorageMeta carrying this reader's load id. The metadata is read once per
    reader (each ``dcp.load`` with it asks again: an import reads a checkpoint in many)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._metadata: dict[Any, Any] = {}

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        super().reset(checkpoint_id)
        if checkpoint_id:
            self._metadata = {}

    def read_metadata(self, *args: Any, **kwargs: Any):
        rank = kwargs.get("rank")
        if rank not in self._metadata:
            path = self._get_metadata_path(rank)
            metadata_file(self.path, Path(path).name)
            with self.fs.create_stream(path, "rb") as stream:
                metadata = load_metadata(stream, str(path))
            confine(metadata, self.path, str(path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            self._metadata[rank] = metadata
        metadata = self._metadata[rank]
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner unpickles non-tensor entries with weights_only=False; refuse any
    entry that a weights_only=True load rejects before handing it to the default path."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        torch.load(value, weights_only=True)
        value.seek(0)
        super().load_bytes(read_item, value)


class SafeEmptyStateDictLoadPlanner(SafeLoadPlanner, _EmptyStateDictLoadPlanner):
    """format_utils' planner for reading a whole checkpoint into an empty dict, with
    SafeLoadPlanner's check of non-tensor entries (weights_only=True first)."""


def dcp_to_torch_save(checkpoint_dir: str, torch_save_path: str) -> None:
    """``format_utils.dcp_to_torch_save`` with the checkpoint read through SafeFileSystemReader
    and SafeEmptyStateDictLoadPlanner (torch's own takes FileSystemReader's pickle.load and
    unpickles non-tensor entries with weights_only=False). The same calls as torch's, whose
    ``_load_state_dict`` fills the dict it is given (``dcp.load`` would fill a copy)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    _load_state_dict(
        state,
        storage_reader=SafeFileSystemReader(checkpoint_dir),
        planner=SafeEmptyStateDictLoadPlanner(),
        no_dist=True,
    )
    torch.save(state, torch_save_path)


def torch_save_to_dcp(torch_save_path: str, checkpoint_dir: str) -> None:
    """``format_utils.torch_save_to_dcp`` with the file read by ``torch.load(weights_only=True)``
    (torch's own uses weights_only=False); then torch's own calls."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_saver import _save_state_dict

    state = torch.load(torch_save_path, weights_only=True)
    _save_state_dict(state, storage_writer=FileSystemWriter(checkpoint_dir), no_dist=True)
