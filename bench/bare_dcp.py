"""The floor a cell is measured against, started by torchrun from bench/benchmark.py.

``noop``: import torch, init gloo, pass a barrier (the cost of any torchrun job).
``dcp WIDTH HIDDEN [DEVICE] [STEPS]``: the benchmark's mlp under FSDP2 with Adam state, on
``cpu`` (gloo; the default) or ``cuda`` (nccl, one GPU per rank), trained ``STEPS`` steps (1)
as the pipeline trains (``zero_grad(set_to_none=True)`` after each), then only a bare
``dcp.save`` and ``dcp.load`` of that state; rank 0 prints one JSON line with the seconds and
the peak RSS of the ranks (and, on cuda, their peak GPU memory).
"""

import json
import resource
import sys
import tempfile
import time

import torch
import torch.distributed as dist


def bare_save_load(dim: int, hidden: int, device: str = "cpu", steps: int = 1) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from pipeline_lib.frameworks import fsdp2
    from pipeline_lib.models import mlp

    mesh = init_device_mesh(device, (dist.get_world_size(),), mesh_dim_names=("shard",))
    model = fsdp2.shard(mlp.build(dim=dim, hidden=hidden).to(device), mesh)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(steps):
        inputs, targets = (t.to(device) for t in model.make_batch(step, 8, 0))
        model.loss_sum(model(inputs), targets)[0].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    directory = [tempfile.mkdtemp(prefix="bare-dcp-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(directory)
    dist.barrier()
    t = time.perf_counter()
    dcp.save(state, checkpoint_id=directory[0])
    save_s = time.perf_counter() - t
    dist.barrier()
    t = time.perf_counter()
    dcp.load(state, checkpoint_id=directory[0])
    load_s = time.perf_counter() - t
    peaks = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0]
    if device == "cuda":
        peaks.append(torch.cuda.max_memory_allocated() / 2**20)
    peak = torch.tensor(peaks, device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    result = {"save_s": save_s, "load_s": load_s, "checkpoint": directory[0]}
    result["peak_rss_mb"] = float(peak[0])
    if device == "cuda":
        result["peak_gpu_mb"] = float(peak[1])
    return result


def main() -> None:
    device = sys.argv[4] if len(sys.argv) > 4 else "cpu"
    if device == "cuda":
        import os

        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("cpu:gloo,cuda:nccl" if device == "cuda" else "gloo")
    result = {}
    if sys.argv[1] == "dcp":
        steps = int(sys.argv[5]) if len(sys.argv) > 5 else 1
        result = bare_save_load(int(sys.argv[2]), int(sys.argv[3]), device, steps)
    dist.barrier()
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
