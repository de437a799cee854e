"""Reproducer (torch only): FSDP2's gradient divide factor on the CPU (gloo), two findings.

1. A divide factor other than the FSDP group's size cannot run a backward on gloo. torchtitan's
   expert parallelism with FSDP2 (v0.2) shards the experts with ``fully_shard`` over the
   data-parallel ranks that hold the same experts (``dp_shard_mod_ep``) and divides their
   gradients by every data-parallel rank (``set_gradient_divide_factor(dp_shard)``; torchtitan's
   main branch sets 1.0 on every FSDP module and scales the loss itself). FSDP2 applies such a
   factor by reduce-scattering with ``ReduceOp.PREMUL_SUM(1 / factor)``, which gloo refuses:
   ``RuntimeError: Cannot use ReduceOp.PREMUL_SUM with Gloo`` in the first backward.
   ``set_force_sum_reduction_for_comms(True)`` (transformers 5.x does it for its expert FSDP:
   non-NCCL backends reject PREMUL_SUM) sums and divides locally, and the backward runs.
2. With that sum reduction, an FSDP group of ONE rank divides the gradient by the factor twice
   (``_fsdp_collectives.foreach_reduce``: the one-rank copy divides by
   ``gradient_divide_factor``, then the post-division divides by it again): a silently wrong
   gradient, factor^2 instead of factor. transformers avoids it (it forces the sum only where
   its expert FSDP group has more than one rank), and so does dcp-matrix's ``fsdp2_ep``.

Run from anywhere (CPU, gloo; torch 2.13.0+cpu):
    torchrun --nproc-per-node 2 scripts/repro/fsdp2_divide_factor_gloo.py              # 1: BUG
    torchrun --nproc-per-node 2 scripts/repro/fsdp2_divide_factor_gloo.py --force-sum  # OK
    torchrun --nproc-per-node 1 scripts/repro/fsdp2_divide_factor_gloo.py --force-sum  # 2: BUG
    torchrun --nproc-per-node 1 scripts/repro/fsdp2_divide_factor_gloo.py              # OK
Prints BUG and exits 1 where the backward raises or a gradient shard is not the sum over the
ranks divided by the factor; OK and 0 where it is.
"""

import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

FACTOR = 4.0  # e.g. dp_shard = 4 ranks, of which these 2 hold the same experts


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = nn.Linear(4, 4, bias=False)
    reference = model.weight.detach().clone()
    fully_shard(model, mesh=mesh)
    model.set_gradient_divide_factor(FACTOR)
    if "--force-sum" in sys.argv:
        model.set_force_sum_reduction_for_comms(True)
    x = torch.full((1, 4), float(rank + 1))
    try:
        model(x).sum().backward()
    except RuntimeError as exc:
        print(f"BUG: rank {rank}: backward raised RuntimeError: {exc}", flush=True)
        return 1
    # d(sum(W x))/dW = ones(4, 1) x^T per rank; summed over ranks, divided by the factor.
    total = sum(float(r + 1) for r in range(world))
    expected = torch.full_like(reference, total / FACTOR)
    shard = model.weight.grad.to_local()
    start = rank * shard.shape[0]
    ok = torch.equal(shard, expected[start : start + shard.shape[0]])
    found = float(shard.flatten()[0])
    print(f"{'OK' if ok else 'BUG'}: rank {rank}: gradient {found:g}, the sum over {world} "
          f"rank(s) / {FACTOR:g} is {total / FACTOR:g}", flush=True)  # fmt: skip
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
