"""Reproducer (torch only): FSDP1's full optimizer state dict with cpu_offload=True on a CPU
device returns every optimizer state but the last of each parameter as a view of one gather
buffer, so ``exp_avg`` holds the ``exp_avg_sq`` values (torch 2.14.1 CPU; 2.13.0 CPU crashes
earlier in the same call).

Cause: torch/distributed/fsdp/_optim_utils.py, _unflatten_orig_param_states: with
cpu_offload=True the ``value.detach().clone()`` is skipped because ``value.cpu()`` is expected
to copy, but on a CPU device ``.cpu()`` returns the same tensor, a view of the all-gather buffer
that the next state name (exp_avg_sq) overwrites. On CUDA ``.cpu()`` copies (untested here).

Run: torchrun --nproc-per-node 2 fsdp1_full_optim_cpu_offload.py
Prints BUG (exit 1) when exp_avg differs from the same call without cpu_offload.
"""

import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP


def main() -> int:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = FSDP(
        nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)),
        device_id=torch.device("cpu"),
        use_orig_params=True,
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(2):
        model(torch.randn(4, 16)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    # The same full state dict without cpu_offload is right (it clones): the expected values.
    _, expected = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    _, full = get_state_dict(model, optimizer, options=options)
    bad = []
    for fqn, state in full["state"].items() if dist.get_rank() == 0 else ():
        if not torch.equal(state["exp_avg"], expected["state"][fqn]["exp_avg"]):
            same_as_sq = torch.equal(state["exp_avg"], state["exp_avg_sq"])
            bad.append(f"{fqn}.exp_avg differs (equals exp_avg_sq: {same_as_sq})")
    rank = dist.get_rank()
    dist.destroy_process_group()
    if bad:
        print(f"BUG on torch {torch.__version__}:", *bad, sep="\n  ")
        return 1
    if rank == 0:
        print(f"OK on torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
