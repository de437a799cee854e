"""Reproducer (torch only): the optimizer state of parameters that trained and were then frozen
(``requires_grad_(False)``, still in the optimizer) does not survive a save and load through
``get_state_dict`` / ``set_state_dict`` (pytorch/pytorch#192202; fix proposed in #192307).

The saver trains a two-layer model with Adam for two steps, freezes the first layer, trains one
more step and saves with DCP: its optimizer holds ``exp_avg``, ``exp_avg_sq`` and ``step`` for the
frozen layer too. The loader is built as a user resuming builds it (same model, the first layer
frozen, the same optimizer over every parameter) and loads with ``get_state_dict`` (the template
DCP fills), ``dcp.load`` and ``set_state_dict``. ``get_state_dict`` first initializes the loader's
empty optimizer state by a zero step of the parameters that require grad only, so the template
has no entry for the frozen layer and ``set_state_dict`` keeps only parameters that require grad:
the frozen layer's optimizer state is dropped. A second load into an optimizer whose state is
partly there (the saver's own, after it trained on) shows the state is not completed either.

Run from anywhere (CPU, gloo):
    python scripts/repro/frozen_midway_optim_state.py                        # one process
    torchrun --nproc-per-node 2 scripts/repro/frozen_midway_optim_state.py   # FSDP2, two ranks
Prints BUG (naming the dropped entries) and exits 1 where it holds; OK and 0 where the loaded
optimizer state has the saver's keys for every parameter.
"""

import os
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict


def build(world: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def step(model, optimizer, seed: int) -> None:
    torch.manual_seed(100 + seed)
    model(torch.randn(4, 8)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def state_keys(model, optimizer) -> dict[str, list[str]]:
    """Parameter name -> its optimizer state's keys, read from the optimizer itself."""
    names = {param: name for name, param in model.named_parameters()}
    return {names[p]: sorted(s) for p, s in optimizer.state.items()}


def main() -> int:
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    folder = [tempfile.mkdtemp(prefix="frozen-midway-") if rank == 0 else None]
    dist.broadcast_object_list(folder)
    saver, optimizer = build(world)
    for seed in range(2):
        step(saver, optimizer, seed)
    saver[0].requires_grad_(False)  # frozen midway; stays in the optimizer
    step(saver, optimizer, 2)
    expected = state_keys(saver, optimizer)
    model_state, optim_state = get_state_dict(saver, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=folder[0])

    loader, loader_optimizer = build(world)
    loader[0].requires_grad_(False)  # as at the save: the same frozen layer, the same groups
    model_state, optim_state = get_state_dict(loader, loader_optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=folder[0])
    set_state_dict(
        loader, loader_optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    fresh = state_keys(loader, loader_optimizer)

    # The saver loads its own checkpoint back (its optimizer state is there, the frozen layer's).
    model_state, optim_state = get_state_dict(saver, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=folder[0])
    set_state_dict(
        saver, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    reloaded = state_keys(saver, optimizer)
    dist.barrier()  # every rank has read the checkpoint: rank 0 removes it
    if rank == 0:
        shutil.rmtree(folder[0])
    dist.destroy_process_group()
    bad = {
        side: sorted(set(expected) - set(got)) + [n for n in got if got[n] != expected.get(n)]
        for side, got in (("fresh loader", fresh), ("saver reloading", reloaded))
    }
    if rank == 0:
        print(f"torch {torch.__version__}, world size {world}")
        print(f"saver's optimizer state: {expected}")
        for side, got in (("fresh loader", fresh), ("saver reloading", reloaded)):
            print(f"{side}: {got}")
    if any(bad.values()):
        if rank == 0:
            print(f"BUG: optimizer state dropped on load: {bad}")
        return 1
    if rank == 0:
        print("OK: every parameter's optimizer state loaded")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    sys.exit(main())
