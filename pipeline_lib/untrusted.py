"""Read DCP's ``.metadata`` without running what a pickle asks for.

``FileSystemReader.read_metadata`` is ``pickle.load``: a ``.metadata`` file can name any
callable (``os.system``) and pickle calls it. ``load_metadata`` unpickles with ``find_class``
admitting only what DCP's ``Metadata`` is made of on torch 2.13 (read off real checkpoints with
``pickletools``): the dataclasses of ``torch.distributed.checkpoint.metadata``, the
``_StorageInfo`` of ``filesystem``, ``torch.Size``, the dtype, layout and memory-format
objects of ``torch`` (and torch's ``_get_layout``, by which a layout is pickled), and
``pathlib`` paths (``StorageMeta.checkpoint_id``). Anything else is refused with
``UntrustedPickle`` naming it, before it is called. ``SafeFileSystemReader`` also refuses a
``.metadata`` that places data outside its folder (``confine``). Imports torch.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta

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


def load_metadata(stream: BinaryIO, where: str = ".metadata"):
    """Unpickle DCP metadata from ``stream``, admitting only ALLOWED; UntrustedPickle (naming
    ``where``) otherwise."""
    try:
        return _MetadataUnpickler(stream).load()
    except UntrustedPickle as exc:
        raise UntrustedPickle(f"{where}: {exc}") from None


class OutsideFolder(ValueError):
    """A ``.metadata`` places an entry's data in a file outside the checkpoint's folder."""


def confine(metadata: Any, folder: str | Path, where: str = ".metadata") -> None:
    """Refuse (OutsideFolder, naming ``where`` and the entry) a ``.metadata`` whose
    ``storage_data`` names a file outside ``folder``: DCP's FileSystemReader opens ``folder /
    relative_path`` as the pickle says (torch 2.13: an absolute path, or one with ``..``,
    reads any file the process can read). Symbolic links are followed."""
    root = Path(folder).resolve()
    for index, info in (getattr(metadata, "storage_data", None) or {}).items():
        relative = getattr(info, "relative_path", "")
        if not (root / relative).resolve().is_relative_to(root):
            raise OutsideFolder(
                f"{where}: refused: entry {getattr(index, 'fqn', index)} is read from "
                f"{relative!r}, outside the checkpoint's folder (a foreign or tampered "
                ".metadata; see docs/untrusted-checkpoints.md)"
            )


class SafeFileSystemReader(FileSystemReader):
    """DCP's FileSystemReader, reading ``.metadata`` with load_metadata and refusing one that
    places data outside the folder (``confine``); torch 2.13's read_metadata otherwise: the
    same path, a StorageMeta carrying this reader's load id."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = load_metadata(stream, str(path))
        confine(metadata, self.path, str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
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
