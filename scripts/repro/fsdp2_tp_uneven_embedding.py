"""Reproducer (torch only): FSDP2 over TP of an embedding whose rows the meshes split unevenly
cannot be saved with DCP, nor loaded from an unsharded checkpoint.

The ends of a decoder under the TP plan of the pipeline's transformer (``tok_embeddings``:
``RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())``, ``output``:
``ColwiseParallel(output_layouts=Replicate())``, both ``Shard(0)`` of the weight's rows), then
``fully_shard`` on the dp dim as frameworks/fsdp2_tp.py does: the rows are
``(_StridedShard(0, sf=tp), Shard(0))``. Where FSDP2's split of a TP shard leaves a last shard
more than one row short (13 rows over tp 2: 7 and 6; 7 over dp 3: 3, 3, 1), the chunk DCP
computes for that rank is not the rank's own rows (2 rows at offset 6 against the next TP
shard's 2 at 7), and on torch 2.13.0+cpu:

- ``dcp.save`` raises ``ValueError: Failed to validate global plan: key:tok_embeddings.weight
  has overlapping chunks`` (``output.weight`` too);
- ``dcp.load`` of a checkpoint of the unsharded model raises ``AssertionError: req
  MetadataIndex(fqn='output.weight', ...) mismatch sizes torch.Size([1, 16]) vs
  torch.Size([2, 16])`` on the rank with the short shard.

The pipeline meets both with ``odd_vocab`` (vocabulary 257) under ``fsdp2_tp_8x2``
(configs/large_mesh.yaml: 129 rows per TP shard; FSDP2 over 8 gives seven of 17 and one of 10).
The smallest mesh found is dp x tp = 3 x 2 (the default here, rows 13; 257 rows show it at
4 x 2 and 8 x 2). 2 x 2 passes (257 rows, 5 rows: a split in two is at most one row short), and
so does 3 x 2 with 257 rows (129 = 3 x 43): fsdp2_tp_2x2 of configs/uneven.yaml passes.

Run from anywhere (CPU, gloo; starts its own dp x tp processes):
    python scripts/repro/fsdp2_tp_uneven_embedding.py [DP TP [ROWS DIM]]
e.g. ``8 2 257 16`` for the pipeline's mesh and model. Prints BUG and exits 1 where the save or
the load fails (or the loaded rows differ), OK and 0 where both give the unsharded rows.
"""

import logging
import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

DP, TP = (int(n) for n in (sys.argv[1:3] if len(sys.argv) > 2 else (3, 2)))
VOCAB, DIM = (int(n) for n in (sys.argv[3:5] if len(sys.argv) > 4 else (13, 16)))


class Model(nn.Module):
    """The ends of a decoder: a token embedding and an output head (no tied weights)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.output = nn.Linear(DIM, VOCAB, bias=False)


def sharded(mesh) -> Model:
    """TP on the inner mesh dim as a decoder's plan shards these two, then FSDP2 on the outer."""
    model = Model()
    plan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "output": ColwiseParallel(output_layouts=Replicate()),
    }
    parallelize_module(model, mesh["tp"], plan)
    fully_shard(model, mesh=mesh["dp"])
    return model


def first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    # DCP's CheckpointException wraps each rank's error: keep the first rank's own message.
    for line in text.splitlines():
        if "Error:" in line and "CheckpointException" not in line:
            return line.strip()[:400]
    return text.splitlines()[0][:400]


def rank_main(rank: int, port: int, folder: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # full_tensor() of a strided shard warns of its two all-gathers on every rank.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    logging.getLogger("torch.distributed.checkpoint.default_planner").setLevel(logging.ERROR)
    dist.init_process_group("gloo", rank=rank, world_size=DP * TP)
    mesh = init_device_mesh("cpu", (DP, TP), mesh_dim_names=("dp", "tp"))
    model = sharded(mesh)
    state = get_model_state_dict(model)
    weight = state["tok_embeddings.weight"]
    local = f"local rows {tuple(weight.to_local().shape)}, placements {weight.placements}"

    # Save: the FSDP2+TP state dict.
    try:
        dcp.save(state, checkpoint_id=os.path.join(folder, "fsdp2_tp"))
        saved = "ok"
    except BaseException as exc:  # DCP's CheckpointException is a BaseException
        saved = first_line(exc)

    # Load: a checkpoint of the unsharded model (plain tensors, as a single process writes it)
    # into the FSDP2+TP state dict, then compared with the unsharded model's rows.
    full = Model().state_dict()
    dcp.save(full, checkpoint_id=os.path.join(folder, "single"))
    target = get_model_state_dict(sharded(mesh))
    for value in target.values():
        value.to_local().zero_()
    try:
        dcp.load(target, checkpoint_id=os.path.join(folder, "single"))
        same = all(torch.equal(target[k].full_tensor(), full[k]) for k in full)
        loaded = "ok, bit for bit" if same else "loaded, but the rows differ"
    except BaseException as exc:
        loaded = first_line(exc)
    results[rank] = (local, saved, loaded)
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(rank_main, args=(port, folder, results), nprocs=DP * TP)
    print(f"torch {torch.__version__}, dp x tp = {DP} x {TP}, embedding {VOCAB} x {DIM}")
    for rank in sorted(results):
        print(f"rank {rank}: {results[rank][0]}")
    saves = {results[rank][1] for rank in results}
    loads = {results[rank][2] for rank in results}
    print("save:", "; ".join(sorted(saves)))
    print("load of an unsharded checkpoint:", "; ".join(sorted(loads)))
    if saves != {"ok"} or loads != {"ok, bit for bit"}:
        print("BUG: DCP cannot save or load FSDP2 over TP of an embedding with uneven rows")
        return 1
    print("OK: the FSDP2+TP embedding saves, and loads an unsharded checkpoint bit for bit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
