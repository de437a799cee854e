"""Reproducer (torch only): a full state dict does not load into a model with a tied weight that
was built on the meta device and materialized with ``to_empty``; under DDP with
``broadcast_from_rank0`` the other ranks then wait forever.

``to_empty`` gives each module its own new parameter, so the loader's ``output.weight`` is no
longer ``embedding.weight`` and its optimizer has one parameter more than the saver's (the
saver's state dict names the tied weight once, under ``embedding.weight``).
``set_optimizer_state_dict(full_state_dict=True)`` then raises ``RuntimeError: Missing
optimizer state for parameter 'output.weight' in checkpoint`` (torch 2.13.0+cpu and
2.14.1+cu130 on the CPU). With
``broadcast_from_rank0=True`` (two or more ranks) only rank 0 has the state and raises; the other
ranks wait in the broadcast rank 0 never joins: a hang, not an error (the pipeline's cells in
mode full with load_init meta into ``ddp_2`` and ``fsdp1_2`` time out).

Run from anywhere (CPU, gloo):
    python scripts/repro/meta_init_tied_full_load.py                        # one process
    torchrun --nproc-per-node 2 scripts/repro/meta_init_tied_full_load.py   # DDP, two ranks
Prints BUG and exits 1 where it holds: the error (one process), rank 1 still waiting 20 s after
rank 0 raised (two ranks); OK and 0 where the load works.
"""

import os
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel as DDP

WAIT_S = 20  # how long rank 1 may wait for the broadcast before it counts as a hang


class Tied(nn.Module):
    """An embedding whose weight the output projection shares (weight tying)."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(16, 8)
        self.block = nn.Linear(8, 8)
        self.output = nn.Linear(8, 16, bias=False)
        self.output.weight = self.embedding.weight

    def forward(self, tokens):
        return self.output(torch.relu(self.block(self.embedding(tokens))))


def trained_full_state() -> tuple[dict, dict]:
    """The saver: two Adam steps, then its full state dict (model and optimizer)."""
    torch.manual_seed(0)
    model = Tied()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(2):
        model(torch.randint(0, 16, (4, 5))).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))


def load(world: int, rank: int) -> None:
    """The loader: built on meta, materialized with to_empty, then the full state loaded."""
    full_model, full_optim = trained_full_state() if rank == 0 else ({}, {})
    with torch.device("meta"):
        model = Tied()
    model.to_empty(device="cpu")
    if rank == 0:
        tied = model.output.weight is model.embedding.weight
        print(f"after to_empty, output.weight is embedding.weight: {tied}", flush=True)
    if world > 1:
        model = DDP(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=world > 1)
    set_model_state_dict(model, full_model, options=options)
    set_optimizer_state_dict(model, optimizer, full_optim, options=options)


def main() -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        try:
            load(1, 0)
        except RuntimeError as exc:
            print(f"BUG (torch {torch.__version__}): {type(exc).__name__}: {exc}")
            return 1
        print(f"OK (torch {torch.__version__}): the full state dict loaded")
        return 0
    dist.init_process_group("gloo", timeout=timedelta(seconds=3 * WAIT_S))
    rank = dist.get_rank()
    if rank == 0:
        try:
            load(world, 0)
        except RuntimeError as exc:
            print(f"rank 0 raised: {type(exc).__name__}: {exc}", flush=True)
            time.sleep(WAIT_S + 10)  # alive, as a trainer that logs the error and goes on
            os._exit(1)
        print(f"OK (torch {torch.__version__}): rank 0 loaded", flush=True)
        dist.destroy_process_group()
        return 0
    done = threading.Event()

    def watchdog():
        if not done.wait(WAIT_S):
            waits = f"still waits in set_optimizer_state_dict {WAIT_S} s after rank 0 raised"
            print(f"BUG (torch {torch.__version__}): rank {rank} {waits} (a hang)", flush=True)
            os._exit(1)

    threading.Thread(target=watchdog, daemon=True).start()
    load(world, rank)
    done.set()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
