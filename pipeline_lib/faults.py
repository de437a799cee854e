"""Faults injected on purpose, to prove each check can fail.

Checkpoint faults change the files after the save job wrote them (before any check reads them);
worker faults change what a save or load job does (below). Each checkpoint
fault returns a description naming the file and entry it changed.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

# Worker faults: the load skips dcp.load / set_state_dict, drops one entry from what it
# verifies, or resumes with twice the learning rate; the last rank is SIGKILLed or hangs, or
# rank 0 dies by SIGSEGV, at save or load. A load fault targets one cell of a load job.
WORKER_FAULTS = (
    "skip_load", "drop_loaded_entry", "skew_resume_lr", "kill_rank_save", "kill_rank_load",
    "hang_save", "hang_load", "segfault_save", "segfault_load",
)  # fmt: skip


def _metadata(checkpoint: Path):
    # We wrote this .metadata (a pickle) in this same run; see README "Untrusted checkpoints".
    with open(checkpoint / ".metadata", "rb") as f:
        return pickle.load(f)


def _write_metadata(checkpoint: Path, metadata) -> None:
    with open(checkpoint / ".metadata", "wb") as f:
        pickle.dump(metadata, f)


def _first_tensor_item(metadata):
    """(fqn, storage info) of the first non-empty tensor chunk, in a fixed order."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    for index, info in sorted(
        metadata.storage_data.items(), key=lambda kv: (kv[0].fqn, str(kv[0].offset))
    ):
        meta = metadata.state_dict_metadata[index.fqn]
        if isinstance(meta, TensorStorageMetadata) and meta.size.numel() > 0 and info.length > 0:
            return index.fqn, info
    raise ValueError("checkpoint holds no tensor data")


def flip_byte(checkpoint: Path) -> str:
    """Flip the lowest bit of the first element of one tensor chunk (one ulp for a float)."""
    fqn, info = _first_tensor_item(_metadata(checkpoint))
    path = checkpoint / info.relative_path
    blob = bytearray(path.read_bytes())
    item = bytes(blob[info.offset : info.offset + info.length])
    # Each chunk is a torch.save zip archive; find the start of its tensor bytes.
    with zipfile.ZipFile(io.BytesIO(item)) as archive:
        data = next(z for z in archive.infolist() if "/data/" in z.filename)
    name_len, extra_len = struct.unpack(
        "<HH", item[data.header_offset + 26 : data.header_offset + 30]
    )
    position = info.offset + data.header_offset + 30 + name_len + extra_len
    blob[position] ^= 0x01
    path.write_bytes(bytes(blob))
    return f"flipped one bit of {fqn} in {info.relative_path} at byte {position}"


def drop_entry(checkpoint: Path) -> str:
    """Remove one tensor entry from the checkpoint's .metadata (its bytes stay in the shard)."""
    metadata = _metadata(checkpoint)
    fqn, _ = _first_tensor_item(metadata)
    del metadata.state_dict_metadata[fqn]
    metadata.storage_data = {k: v for k, v in metadata.storage_data.items() if k.fqn != fqn}
    _write_metadata(checkpoint, metadata)
    return f"dropped entry {fqn} from .metadata"


def change_shape(checkpoint: Path) -> str:
    """Record a transposed/grown shape for one tensor entry in .metadata."""
    import torch

    metadata = _metadata(checkpoint)
    fqn, _ = _first_tensor_item(metadata)
    meta = metadata.state_dict_metadata[fqn]
    old = list(meta.size)
    new = [*old[:-1], old[-1] + 1] if old else [1]
    meta.size = torch.Size(new)
    _write_metadata(checkpoint, metadata)
    return f"changed the shape of {fqn} from {old} to {new} in .metadata"


CHECKPOINT_FAULTS: dict[str, Callable[[Path], str]] = {
    "flip_byte": flip_byte,
    "drop_entry": drop_entry,
    "change_shape": change_shape,
}

ALL_FAULTS = (*CHECKPOINT_FAULTS, *WORKER_FAULTS)
