"""Reproducer (torch and torch-checkpointing 0.1.1 only): the default direct I/O on ext4.

torch-checkpointing's local filesystem storage has direct I/O on by default
(``LocalFileSystemStorageConfig(use_direct_io=True)``): its ``WriteStream`` opens each file with
``O_DIRECT``, which ext4 accepts, then writes the serialized item through a buffered file object
in pieces of any size; the flush in ``close()`` hands the kernel an unaligned write and fails
with ``OSError: [Errno 22] Invalid argument``. The fallback to buffered I/O it has covers an
``open`` that fails only (a filesystem without ``O_DIRECT``, such as tmpfs). So a save with the
library's defaults fails on ext4; with ``use_direct_io=False`` the same save writes its files.

Run from anywhere (one process, no GPU; `bash scripts/setup.sh --torch-checkpointing`):
    python scripts/repro/torch_checkpointing_direct_io.py --dir /path/on/ext4           # BUG
    python scripts/repro/torch_checkpointing_direct_io.py --dir /path/on/ext4 --off     # OK
Prints BUG and exits 1 where the save raises; OK and 0 where it writes the checkpoint.
``--dir`` (default: the current folder) names where the checkpoint folder is made.
"""

import argparse
import os
import sys
import tempfile

import torch
from torch_checkpointing import CheckpointManager
from torch_checkpointing.storage.filesystem import LocalFileSystemStorageConfig


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default=os.getcwd())
    parser.add_argument("--off", action="store_true", help="use_direct_io=False")
    args = parser.parse_args()
    storage = LocalFileSystemStorageConfig(use_direct_io=not args.off)
    manager = CheckpointManager(CheckpointManager.Config(storage_config=storage))
    with tempfile.TemporaryDirectory(dir=args.dir) as parent:
        folder = os.path.join(parent, "checkpoint")
        try:
            future = manager.save(folder, {"model": {"w": torch.arange(10.0)}})
            if future is not None:
                future.result()
        except OSError as exc:
            print(f"BUG: save with use_direct_io={not args.off} raised OSError: {exc}")
            return 1
        finally:
            manager.close()
        print(f"OK: use_direct_io={not args.off} wrote {sorted(os.listdir(folder))}")
    return 0


if __name__ == "__main__":  # the library's writer process is spawned: it imports this file
    sys.exit(main())
