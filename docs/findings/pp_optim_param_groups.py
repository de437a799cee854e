"""Reproducer (torch only): an unflattened optimizer state dict saved with DCP under pipeline
parallelism keeps one stage's ``param_groups.0.params``; loaded back, the other stages'
optimizers get param groups without their hyperparameters and ``Adam.step`` raises
``KeyError: 'betas'`` (torch 2.13.0 CPU).

Each pipeline stage holds part of the model (the other stages' layers are removed, names kept,
as torchtitan splits) and its own optimizer. ``get_optimizer_state_dict`` names a param group's
parameters by FQN: ``optim.param_groups.0.params`` differs by stage, but it is a non-tensor entry
under the same key on every rank, and ``dcp.save`` writes one rank's copy. ``dcp.load`` then
gives every stage that list, and ``set_optimizer_state_dict`` matches groups by those FQNs.
With ``flatten_optimizer_state_dict=True`` (what torchtitan uses) the keys are per parameter
and the same steps pass.

Run: torchrun --nproc-per-node 2 pp_optim_param_groups.py [--flatten]
Prints BUG (exit 1) when a stage's optimizer cannot step after the load, OK (exit 0) otherwise.
"""

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


def stage(rank: int) -> nn.Module:
    """Layers 0-1 on stage 0, layers 2-3 on stage 1; the full model's names are kept."""
    torch.manual_seed(0)
    layers = nn.ModuleDict({str(i): nn.Linear(8, 8) for i in range(4)})
    for i in range(4):
        if i // 2 != rank:
            del layers[str(i)]
    return layers


def train_step(model: nn.Module, optimizer) -> None:
    for layer in model.values():
        layer(torch.ones(2, 8)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def main(flatten: bool) -> int:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    model = stage(rank)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    train_step(model, optimizer)
    path = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(path)
    msd, osd = get_state_dict(model, optimizer, options=options)
    if not flatten:
        print(f"rank {rank} saves param_groups.0.params = {osd['param_groups'][0]['params']}")
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path[0])

    model = stage(rank)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    msd, osd = get_state_dict(model, optimizer, options=options)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path[0])
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"], options=options)  # fmt: skip
    print(f"rank {rank} loaded param group: {sorted(optimizer.param_groups[0])}")
    try:
        train_step(model, optimizer)
        error = ""
    except KeyError as exc:
        error = f"rank {rank}: Adam.step raised KeyError {exc}"
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    dist.destroy_process_group()
    if any(errors):
        if rank == 0:
            print("BUG: " + "; ".join(e for e in errors if e))
        return 1
    if rank == 0:
        print("OK: every stage's optimizer steps after the load")
    return 0


if __name__ == "__main__":
    sys.exit(main("--flatten" in sys.argv))
