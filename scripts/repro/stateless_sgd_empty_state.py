"""Reproducer (torch only): a stateless optimizer (SGD without momentum: no per-parameter state
at all) gains empty state entries (``{}``) through ``get_state_dict`` / ``set_state_dict``
(pytorch/pytorch#192225).

The saver trains with ``SGD(momentum=0)`` for two steps: ``optimizer.state`` is empty. It saves
with DCP (sharded) and, on another path, as a full state dict; a loader built the same way loads
each with ``set_state_dict``. Every optimizer's ``state`` is read from the object itself after
each call: an entry ``{}`` for a parameter is a state the saver never had
(``Optimizer.state_dict()`` lists it, so the loader's state dict has keys the saver's had not).

Run from anywhere (CPU, gloo):
    python scripts/repro/stateless_sgd_empty_state.py                        # one process
    torchrun --nproc-per-node 2 scripts/repro/stateless_sgd_empty_state.py   # FSDP2, two ranks
Prints BUG (naming where entries appeared, or the error a load raised) and exits 1 where either
holds; OK and 0 where every load works and every optimizer's state stays empty. torch 2.13.0+cpu
gains no entry on these paths, but the full state dict load raises ``AssertionError: Expected
device to be set`` (the loader's own optimizer state has no tensor to take a device from).
"""

import os
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)


def build(world: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    return model, torch.optim.SGD(model.parameters(), lr=0.01)


def entries(model, optimizer) -> dict[str, dict]:
    """Parameter name -> its optimizer state's keys (``optimizer.state`` itself)."""
    names = {param: name for name, param in model.named_parameters()}
    return {names[p]: sorted(s) for p, s in optimizer.state.items()}


def main() -> int:
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    folder = [tempfile.mkdtemp(prefix="stateless-sgd-") if rank == 0 else None]
    dist.broadcast_object_list(folder)
    saver, optimizer = build(world)
    for seed in range(2):
        torch.manual_seed(100 + seed)
        saver(torch.randn(4, 8)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seen = {"saver after training": entries(saver, optimizer)}
    model_state, optim_state = get_state_dict(saver, optimizer)
    seen["saver after get_state_dict"] = entries(saver, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=folder[0])
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full_model, full_optim = get_state_dict(saver, optimizer, options=full)

    loader, loader_optimizer = build(world)
    model_state, optim_state = get_state_dict(loader, loader_optimizer)
    seen["loader after get_state_dict"] = entries(loader, loader_optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=folder[0])
    set_state_dict(
        loader, loader_optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    seen["loader after DCP load"] = entries(loader, loader_optimizer)

    other, other_optimizer = build(world)
    try:
        set_state_dict(
            other,
            other_optimizer,
            model_state_dict=full_model,
            optim_state_dict=full_optim,
            options=full,
        )
        seen["loader after full state dict load"] = entries(other, other_optimizer)
    except (Exception, AssertionError) as exc:  # torch 2.13: "Expected device to be set"
        failed = f"{type(exc).__name__}: {exc}"
    else:
        failed = ""
    dist.barrier()  # every rank has read the checkpoint: rank 0 removes it
    if rank == 0:
        shutil.rmtree(folder[0])
    dist.destroy_process_group()
    gained = {where: got for where, got in seen.items() if got}
    if rank == 0:
        print(f"torch {torch.__version__}, world size {world}")
        for where, got in seen.items():
            print(f"{where}: {got}")
    if failed and rank == 0:
        print(f"BUG: the full state dict of a stateless optimizer does not load: {failed}")
    if gained and rank == 0:
        print(f"BUG: a stateless optimizer gained state entries: {gained}")
    if gained or failed:
        return 1
    if rank == 0:
        print("OK: every optimizer's state stayed empty")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29532")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    sys.exit(main())
