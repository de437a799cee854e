"""Reproducer (torch only): a pipeline stage's forward runs once more than its microbatches in the
first step of a schedule (the stage's metadata inference), on real tensors: the first stage on
the first microbatch, the later stages on uninitialized ``torch.empty`` tensors.

A module whose forward updates state counts that extra forward. A mixture of experts does, as
torchtitan's MoE does: it adds each forward's tokens per expert to ``tokens_per_expert``, from
which the load-balancing ``expert_bias`` moves before the optimizer step. So under PP the first
step of every process (a fresh job, and a job resumed from a checkpoint) moves the bias from one
forward too many, some of it from uninitialized memory: a run resumed under PP routes otherwise
than the run that saved the checkpoint (dcp-matrix: every cell of the built-in ``moe`` loaded
into ``pp_2`` fails its resume check by about 2e-5, its state exact; configs/ep.yaml).

Run from anywhere (CPU, gloo; torch 2.13.0+cpu):
    torchrun --nproc-per-node 2 scripts/repro/pp_metadata_inference_forward.py
Prints BUG and exits 1 where a stage's forward runs more often than its microbatches in a step;
OK and 0 where it runs once per microbatch.
"""

import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

MICROBATCHES = 4


class CountingStage(nn.Module):
    """A linear layer that counts its forwards (a router's tokens-per-expert in small)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        return self.linear(x)


def main() -> int:
    dist.init_process_group("gloo")
    rank, stages = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    module = CountingStage()
    stage = PipelineStage(module, rank, stages, torch.device("cpu"))
    schedule = ScheduleGPipe(stage, MICROBATCHES, loss_fn=lambda output, target: output.sum())
    counts = []
    for _ in range(2):
        before = module.forwards
        inputs = torch.randn(MICROBATCHES, 4) if rank == 0 else None
        target = torch.zeros(MICROBATCHES, 4) if rank == stages - 1 else None
        args = (inputs,) if rank == 0 else ()
        schedule.step(*args, target=target)
        counts.append(module.forwards - before)
    ok = counts == [MICROBATCHES, MICROBATCHES]
    print(f"{'OK' if ok else 'BUG'}: stage {rank}: forwards per step {counts} for "
          f"{MICROBATCHES} microbatches", flush=True)  # fmt: skip
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
