"""Hugging Face ``save_pretrained`` folders as existing checkpoints (``checkpoints.<name>.format:
hf_safetensors``, docs/existing-checkpoints.md): model weights only, in ``model.safetensors`` or in
shards listed by ``model.safetensors.index.json``, named as the model names its parameters.

The folder is untrusted input (docs/untrusted-checkpoints.md). ``read_folder`` checks it before
anything reads a tensor, from the files' real sizes and bounded reads of the small parts (the
index, each file's JSON header), each failure one line naming the file: every file the index
names is a regular file of the folder itself (a name with a folder, ``..`` or an absolute path is
refused: DCP's ``HuggingFaceStorageReader`` reads only the folder's own ``*.safetensors``), every
``*.safetensors`` file of the folder is one the index names (torch 2.13's reader ignores the
index and reads every one of them, so a file left beside the shards would be loaded too), each
tensor is in the file the index says and in no other, and each tensor's bytes, as its header
declares them, lie inside its file and are what its dtype and shape need. ``tensors`` then reads
the values with the ``safetensors`` library itself (``safe_open``), not through the reader the
load cells test: the import's reference. ``config.json`` is read as data (bounded JSON, never
imported: no ``auto_map``, no remote code) to compare the architecture and the values an
``hf_models`` entry sets with those the folder was saved with. Torch-free but for ``tensors``.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline_lib.common.errors import human_bytes, printable

FORMAT = "hf_safetensors"  # checkpoints.<name>.format
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CONFIG = "config.json"
SUFFIX = ".safetensors"
# safetensors' own limit of a file's JSON header (MAX_HEADER_SIZE): read whole, so bounded.
HEADER_MAX_BYTES = 100_000_000
# The index lists every tensor's file: a few MiB for the largest models published.
INDEX_MAX_BYTES = 64 * 2**20
CONFIG_MAX_BYTES = 2**20
# DCP's own sharded safetensors (HuggingFaceStorageWriter without consolidation) mark each file
# with this; its tensors are chunks of larger ones, not what save_pretrained writes.
DCP_SHARDING_KEY = "DCP_SHARDING_INFO"
# Bytes per element of each safetensors dtype.
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
            "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8,
            "F64": 8}  # fmt: skip
_LENGTH = 8  # a safetensors file starts with its header's length, u64 little-endian
_MAX_DIMS = 64


class HFFolderError(ValueError):
    """A Hugging Face folder that is not read; the message names the file and why."""


@dataclass(frozen=True)
class Stored:
    """Where a tensor's bytes are: its file, and as its header declares it."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # the byte range in the file (its header's offsets, after the header)
    end: int


@dataclass(frozen=True)
class Folder:
    """A checked Hugging Face folder: its safetensors files (name order), every tensor's place,
    whether an index lists them, and the bytes its digest is of (the index and the headers)."""

    path: str
    files: tuple[str, ...]
    tensors: dict[str, Stored]
    indexed: bool
    described_by: bytes

    def digest(self) -> str:
        """The SHA-256 of the index (if any) and every file's name and header: the
        ``source_metadata_sha256`` of a row (which checkpoint it is about)."""
        return hashlib.sha256(self.described_by).hexdigest()


def folder_error(path: str) -> str | None:
    """Why ``path`` cannot be a Hugging Face folder, or None, for the config check: it holds
    INDEX or SINGLE, a regular file inside it (a link to one in it is fine). Reads no file."""
    root = Path(path)
    if not root.is_dir():
        return f"{path!r} is not a folder"
    for name in (INDEX, SINGLE):
        if (root / name).exists() or (root / name).is_symlink():
            return _file_error(root / name, root, name)
    return f"{path!r} holds neither {SINGLE} nor {INDEX} (a save_pretrained folder)"


def read_folder(path: str) -> Folder:
    """The folder, checked (HFFolderError, one line naming the file, otherwise): see the
    module's docstring. Reads the index and the headers (bounded), no tensor."""
    root = Path(path)
    if error := folder_error(path):
        raise HFFolderError(error)
    present = _safetensors_files(root)
    index_bytes = b""
    if (root / INDEX).exists():
        index_bytes = _bounded_read(root / INDEX, root, INDEX, INDEX_MAX_BYTES)
        weight_map = _weight_map(index_bytes)
        listed = sorted(set(weight_map.values()))
    else:
        weight_map, listed = None, [SINGLE]
    if stray := sorted(set(present) - set(listed)):
        where = f"not listed in {INDEX}" if weight_map else f"beside {SINGLE} without {INDEX}"
        raise HFFolderError(
            f"{printable(stray[0])}: {where}, but DCP's HuggingFaceStorageReader reads every "
            ".safetensors file of the folder (remove or move it)"
        )
    tensors: dict[str, Stored] = {}
    described = [index_bytes]
    for name in listed:
        header, raw = _header(root, name, weight_map)
        described.append(name.encode() + b"\0" + raw)
        for tensor, stored in header.items():
            if tensor in tensors:
                raise HFFolderError(
                    f"{printable(name)}: tensor {printable(tensor)} is also in "
                    f"{printable(tensors[tensor].file)} (DCP's reader would read both)"
                )
            tensors[tensor] = stored
    if weight_map is not None:
        _index_agrees(weight_map, tensors)
    return Folder(str(path), tuple(listed), tensors, weight_map is not None, b"".join(described))


def _file_error(path: Path, root: Path, name: str) -> str | None:
    """Why ``path`` (``name`` in the folder) is not read: a link out of the folder or not a
    regular file; None for a regular file inside it or a missing one."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        target = printable(str(resolved))
        return f"{printable(name)}: refused: a link to {target!r}, outside the checkpoint's folder"
    try:
        mode = resolved.stat().st_mode
    except FileNotFoundError:
        return f"{printable(name)}: missing" if path.is_symlink() else None
    if not stat.S_ISREG(mode):
        return f"{printable(name)}: refused: not a regular file"
    return None


def _safetensors_files(root: Path) -> list[str]:
    """The folder's own ``*.safetensors`` entries, as DCP's reader lists them (``iterdir``),
    each a regular file inside the folder: the reader opens every one of them."""
    names = sorted(p.name for p in root.iterdir() if p.name.endswith(SUFFIX))
    for name in names:
        if error := _file_error(root / name, root, name):
            raise HFFolderError(error)
    return names


def _bounded_read(path: Path, root: Path, name: str, limit: int) -> bytes:
    """The bytes of a small file of the folder (a regular file inside it of at most ``limit``
    bytes: its size from ``stat`` before it is opened)."""
    if not path.exists() and not path.is_symlink():
        raise HFFolderError(f"{printable(name)}: missing")
    if error := _file_error(path, root, name):
        raise HFFolderError(error)
    size = path.stat().st_size
    if size > limit:
        raise HFFolderError(
            f"{printable(name)}: refused: {human_bytes(size)}, more than the "
            f"{human_bytes(limit)} read of one"
        )
    with open(path, "rb") as f:
        return f.read(limit)


def _weight_map(raw: bytes) -> dict[str, str]:
    """The index's ``weight_map`` (tensor -> file), each file a plain name of a
    ``.safetensors`` file of the folder itself."""
    try:
        index = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise HFFolderError(f"{INDEX}: not JSON ({printable(str(exc))[:200]})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise HFFolderError(f"{INDEX}: no weight_map (a JSON object of tensor name -> file)")
    for tensor, file in weight_map.items():
        if not isinstance(file, str):
            raise HFFolderError(
                f"{INDEX}: weight_map gives {printable(tensor)} {printable(repr(file))}, not a "
                "file name"
            )
        if file in ("", ".", "..") or os.path.basename(file) != file or "\\" in file:
            raise HFFolderError(
                f"{INDEX}: refused: weight_map places {printable(tensor)} in "
                f"{printable(repr(file))}, outside the checkpoint's folder (a file of the folder "
                "itself is named by its name alone)"
            )
        if not file.endswith(SUFFIX):
            raise HFFolderError(
                f"{INDEX}: weight_map places {printable(tensor)} in {printable(repr(file))}, "
                f"not a {SUFFIX} file (DCP's reader reads those only)"
            )
    return weight_map


def _header(root: Path, name: str, weight_map: dict | None) -> tuple[dict[str, Stored], bytes]:
    """A file's tensors as its header declares them, checked against the file's size before any
    tensor is read; (tensors, the header's raw bytes with its length)."""
    path = root / name
    if not path.exists():
        listed = sorted(t for t, f in (weight_map or {}).items() if f == name)
        first = f"; first {printable(listed[0])}" if listed else ""
        raise HFFolderError(
            f"{printable(name)}: missing ({INDEX} places {len(listed)} tensor(s) in it{first})"
        )
    if error := _file_error(path, root, name):
        raise HFFolderError(error)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(_LENGTH)
        if len(head) < _LENGTH:
            raise HFFolderError(f"{printable(name)}: {size} bytes, too short for a header")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - _LENGTH, HEADER_MAX_BYTES):
            raise HFFolderError(
                f"{printable(name)}: declares a header of {length} bytes; the file holds "
                f"{size - _LENGTH} after the length (at most {HEADER_MAX_BYTES} are read)"
            )
        raw = f.read(length)
    data_bytes = size - _LENGTH - length
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise HFFolderError(
            f"{printable(name)}: header not JSON ({printable(str(exc))[:200]})"
        ) from None
    if not isinstance(header, dict):
        raise HFFolderError(f"{printable(name)}: header is not a JSON object")
    extra = header.pop("__metadata__", None) or {}
    if isinstance(extra, dict) and DCP_SHARDING_KEY in extra:
        raise HFFolderError(
            f"{printable(name)}: holds {DCP_SHARDING_KEY} (DCP's own sharded safetensors: its "
            "tensors are chunks), not a save_pretrained file"
        )
    begin = _LENGTH + length
    tensors = {
        tensor: _stored(name, tensor, info, data_bytes, begin) for tensor, info in header.items()
    }
    return tensors, head + raw


def _stored(file: str, tensor: str, info: Any, data_bytes: int, begin: int) -> Stored:
    """One header entry, checked: a known dtype, a shape of non-negative ints, data offsets
    inside the file's data whose length is what the dtype and shape need."""
    where = f"{printable(file)}: tensor {printable(tensor)}"
    if not isinstance(info, dict):
        raise HFFolderError(f"{where}: its header entry is not a JSON object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in ITEMSIZE:
        raise HFFolderError(f"{where}: unknown dtype {printable(repr(dtype))[:60]}")
    if not _ints(shape, _MAX_DIMS) or not _ints(offsets, 2) or len(offsets) != 2:
        raise HFFolderError(f"{where}: shape or data_offsets are not lists of non-negative ints")
    start, stop = offsets
    numel = 1
    for dim in shape:
        numel *= dim
    needed = numel * ITEMSIZE[dtype]
    if not start <= stop <= data_bytes:
        raise HFFolderError(
            f"{where}: declares its bytes at [{start}, {stop}) of the data, which holds "
            f"{data_bytes} bytes"
        )
    if stop - start != needed:
        raise HFFolderError(
            f"{where}: {dtype} {list(shape)} needs {needed} bytes, its header declares "
            f"{stop - start}"
        )
    return Stored(file, dtype, tuple(shape), begin + start, begin + stop)


def _ints(value: Any, most: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) <= most
        and all(type(v) is int and v >= 0 for v in value)
    )


def _index_agrees(weight_map: dict[str, str], tensors: dict[str, Stored]) -> None:
    """Each tensor of the index is in the file it names, and every tensor of the files is in
    the index (transformers reads by the index, DCP's reader by the files)."""
    for tensor, file in sorted(weight_map.items()):
        found = tensors.get(tensor)
        if found is None or found.file != file:
            where = f"in {printable(found.file)}" if found else "in no file"
            raise HFFolderError(
                f"{INDEX}: places {printable(tensor)} in {printable(file)}, but it is {where}"
            )
    if unlisted := sorted(set(tensors) - set(weight_map)):
        tensor = unlisted[0]
        raise HFFolderError(
            f"{printable(tensors[tensor].file)}: tensor {printable(tensor)} is not in {INDEX}"
        )


def tensors(folder: Folder) -> Iterator[tuple[str, Any]]:
    """Every tensor of a checked folder, read by the ``safetensors`` library (``safe_open``:
    whole tensors, in the file's dtype), file by file in name order."""
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for tensor, stored in folder.tensors.items():
        by_file.setdefault(stored.file, []).append(tensor)
    for file in folder.files:
        with safe_open(str(Path(folder.path) / file), framework="pt") as f:
            for tensor in sorted(by_file.get(file, [])):
                yield tensor, f.get_tensor(tensor)


def config_json(path: str) -> dict | None:
    """The folder's ``config.json`` as data (bounded JSON; nothing in it is imported or run),
    or None without one."""
    root = Path(path)
    if not (root / CONFIG).exists() and not (root / CONFIG).is_symlink():
        return None
    raw = _bounded_read(root / CONFIG, root, CONFIG, CONFIG_MAX_BYTES)
    try:
        found = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise HFFolderError(f"{CONFIG}: not JSON ({printable(str(exc))[:200]})") from None
    if not isinstance(found, dict):
        raise HFFolderError(f"{CONFIG}: not a JSON object")
    return found


def config_errors(found: dict, hf: dict, model: str) -> list[str]:
    """How the folder's ``config.json`` (``found``) differs from the ``hf_models`` entry
    ``hf`` of ``model``: the architecture (one of its ``architectures``), and every value the
    entry's ``config`` sets that config.json has too."""
    errors = []
    architectures = found.get("architectures")
    if isinstance(architectures, list) and hf["architecture"] not in architectures:
        errors.append(
            f"{CONFIG}: architectures {printable(repr(architectures))[:200]}, the model "
            f"(hf_models.{model}) is {hf['architecture']}"
        )
    for key, value in sorted(hf.get("config", {}).items()):
        if key in found and found[key] != value:
            errors.append(
                f"{CONFIG}: {key} is {printable(repr(found[key]))[:100]}, hf_models.{model} "
                f"sets {value!r}"
            )
    return errors


def summary(found: dict | None) -> dict | None:
    """What an import record keeps of config.json: the architecture, the model type, the dtype
    it was saved in, whether it names code of its own (``auto_map``: never imported here)."""
    if found is None:
        return None
    keys = ("architectures", "model_type", "dtype", "torch_dtype", "tie_word_embeddings")
    kept = {k: found[k] for k in keys if k in found and _plain(found[k])}
    kept["auto_map"] = "auto_map" in found
    return kept


def _plain(value: Any) -> bool:
    return (
        value is None
        or isinstance(value, (bool, int, float, str))
        or (isinstance(value, list) and all(isinstance(v, str) for v in value) and len(value) < 16)
    )
