"""DCP's FileSystemReader reads a file outside the checkpoint folder when .metadata says so.

A finding (docs/torch-notes.md): exits 0 and says True where it holds (torch 2.13.0+cpu,
2.14.1+cu130 and 2.15.0+cu132 on CPU), 1 where the reader stays in its folder. One process,
no process group: ``python scripts/repro/dcp_reads_outside_folder.py``.
"""

import dataclasses
import pickle
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

warnings.simplefilter("ignore")
root = Path(tempfile.mkdtemp())
dcp.save({"w": torch.zeros(3, 2)}, checkpoint_id=str(root / "ckpt"), no_dist=True)
dcp.save({"w": torch.full((3, 2), 7.0)}, checkpoint_id=str(root / "other"), no_dist=True)
md = pickle.loads((root / "ckpt/.metadata").read_bytes())
index = next(i for i in md.storage_data if i.fqn == "w")
info = md.storage_data[index]
(root / "outside.distcp").write_bytes((root / "other" / info.relative_path).read_bytes())
md.storage_data[index] = dataclasses.replace(info, relative_path="../outside.distcp")
(root / "ckpt/.metadata").write_bytes(pickle.dumps(md))
state = {"w": torch.empty(3, 2)}
dcp.load(state, storage_reader=dcp.FileSystemReader(str(root / "ckpt")), no_dist=True)
read_outside = bool((state["w"] == 7.0).all())
print(f"torch {torch.__version__}: read the file outside the folder: {read_outside}")
sys.exit(0 if read_outside else 1)
