"""Check 1's reader for engine torch_checkpointing: the files its CheckpointManager wrote, read
back without the library and without a process group, as entries named as DCP names them.

The library writes each item of a rank as ``<item>_<rank>.pt`` (a torch.save of the item's
nested dict; read here with ``weights_only=True``) and the checkpoint's layout in
``metadata.pkl``, a pickle this reader never loads. A single-rank save's files hold every
entry whole; a multi-rank save's hold each rank's shards, whose offsets only ``metadata.pkl``
holds: this reader refuses such a checkpoint (check 1 then names why) rather than trust the
pickle. On CPU (gloo) a multi-rank save fails inside the library before it writes anything
(docs/findings.md)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pipeline_lib.verify.entries import flatten
from pipeline_lib.verify.readers import shares

_ITEM_FILE = re.compile(r"(?P<item>.+)_(?P<rank>\d+)\.pt")


def item_files(path: str) -> dict[str, list[int]]:
    """The checkpoint's items -> the ranks that wrote a file of it."""
    found: dict[str, list[int]] = {}
    for file in sorted(Path(path).iterdir()):
        if match := _ITEM_FILE.fullmatch(file.name):
            found.setdefault(match["item"], []).append(int(match["rank"]))
    if not found:
        raise FileNotFoundError(f"no <item>_<rank>.pt file of torch_checkpointing in {path}")
    return found


def entries(path: str, share: tuple[int, int] = (0, 1)) -> Iterator[tuple[str, Any]]:
    """Every entry of a single-rank torch_checkpointing checkpoint (``share`` as for
    readers.checkpoint_entries), ``<item>.<flattened key>``, in name order."""
    files = item_files(path)
    sharded = sorted(item for item, ranks in files.items() if ranks != [0])
    if sharded:
        raise ValueError(
            f"items {sharded} of {path} were written by several ranks: their shards' offsets "
            "are only in metadata.pkl (a pickle), which check 1 does not load"
        )
    flat: dict[str, Any] = {}
    for item in files:
        state = torch.load(Path(path) / f"{item}_0.pt", mmap=True, weights_only=True)
        flat.update(flatten({item: state}))
    sizes = {n: v.nbytes if isinstance(v, torch.Tensor) else 0 for n, v in flat.items()}
    for name in shares(sizes, share[1])[share[0]]:
        yield name, flat[name]
