"""Reproducer (torch only): tensor parallelism's canonical MLP plan (``ColwiseParallel`` then
``RowwiseParallel``) fails in the forward when the TP degree does not divide the hidden size.

``ColwiseParallel`` (default ``use_local_output=True``) hands the next module its local shard as
a plain tensor: 13 of 25 columns on rank 0, 12 on rank 1. ``RowwiseParallel`` makes it a DTensor
again with ``DTensor.from_local(x, mesh, (Shard(-1),))`` and no ``shape``, which assumes even
shards: a global width of 13 x 2 = 26 on rank 0 (12 x 2 = 24 on rank 1) against the weight's 25,
and sharding propagation raises ``RuntimeError: a and b must have same reduction dim, but got
[8, 26] X [25, 7].`` (torch 2.13.0+cpu). The parameters themselves shard unevenly and a DCP
checkpoint of them saves and loads under any layout (the pipeline's cells loaded into TP pass
every state check, then fail the same way in the resumed training); the pipeline's model
``mlp_uneven`` (dims 7, 25, 13) meets it under ``tp_2`` and ``fsdp2_tp_2x2``. With
``ColwiseParallel(use_local_output=False)`` the DTensor keeps its true global shape and the same
forward runs (printed below, for comparison; the pipeline uses torch's defaults).

Run from anywhere (CPU, gloo; starts its own 2 processes):
    python scripts/repro/tp_uneven_colwise_rowwise.py
Prints BUG and exits 1 where the default plan raises, OK and 0 where it runs and gives the
unsharded model's output.
"""

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

WORLD = 2
DIM, HIDDEN = 7, 25  # 2 does not divide 25


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, DIM))


def forward(mesh, use_local_output: bool) -> str:
    """The TP forward's outcome: 'same' (the unsharded output), 'differs', or the error."""
    inputs = torch.randn(8, DIM, generator=torch.Generator().manual_seed(1))
    expected = mlp()(inputs)
    model = mlp()
    plan = {"0": ColwiseParallel(use_local_output=use_local_output), "2": RowwiseParallel()}
    parallelize_module(model, mesh, plan)
    try:
        out = model(inputs)
    except RuntimeError as exc:
        return f"RuntimeError: {str(exc).splitlines()[0]}"
    return "same" if torch.allclose(out, expected, atol=1e-6) else "differs"


def rank_main(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    results[rank] = (forward(mesh, True), forward(mesh, False))
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(rank_main, args=(port, results), nprocs=WORLD)
    print(f"torch {torch.__version__}, TP degree {WORLD}, hidden {HIDDEN}")
    for rank in sorted(results):
        default, local_off = results[rank]
        print(f"rank {rank}: default plan: {default}; use_local_output=False: {local_off}")
    if any(results[rank][0] != "same" for rank in results):
        print("BUG: ColwiseParallel -> RowwiseParallel fails on a hidden size TP does not divide")
        return 1
    print("OK: the default plan runs and gives the unsharded output")
    return 0


if __name__ == "__main__":
    sys.exit(main())
