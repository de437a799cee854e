"""Reproducer (torch and torch-checkpointing 0.1.1 only): a multi-rank save on the CPU (gloo).

torch-checkpointing's ``CheckpointManager`` with a resharder (its ``DefaultResharder``, as its
README and torchtitan's backend configure it) gathers every rank's sharding metadata when it
saves (``DefaultMetadataManager._all_gather_pickled_data``), and makes the tensors of that
gather on device ``"cuda"`` whatever the process group's backend: on a CPU-only torch every
multi-rank save raises ``AssertionError: Torch not compiled with CUDA enabled`` (on a machine
with CUDA and gloo, the gloo collective gets CUDA tensors). A single-rank save gathers nothing
and runs; its checkpoint loads into 2-rank layouts on gloo (the loader only extracts its own
metadata).

Run from anywhere (CPU, gloo; torch 2.13.0+cpu; `bash scripts/setup.sh --torch-checkpointing`):
    torchrun --nproc-per-node 2 scripts/repro/torch_checkpointing_cpu_gather.py   # BUG
    torchrun --nproc-per-node 1 scripts/repro/torch_checkpointing_cpu_gather.py   # OK
Prints BUG and exits 1 where the save raises; OK and 0 where it writes the checkpoint. On a
GPU machine, run it with `--device cuda` (nccl): the documented configuration, which should
print OK.
"""

import sys
import tempfile

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch_checkpointing import CheckpointManager, ItemSpec
from torch_checkpointing.default_resharder import DefaultResharder
from torch_checkpointing.storage.filesystem import LocalFileSystemStorageConfig


def main() -> int:
    device = "cuda" if "--device" in sys.argv and sys.argv[-1] == "cuda" else "cpu"
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if device == "cuda":
        torch.cuda.set_device(rank)
    model = nn.Linear(8, 8, device=device)
    if world > 1:
        fully_shard(model, mesh=init_device_mesh(device, (world,)))
    model_state, _ = get_state_dict(model, [])
    folder = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(folder, src=0)
    spec = ItemSpec(resharder=DefaultResharder())
    # Direct I/O off: on ext4 it fails on its own (torch_checkpointing_direct_io.py).
    config = CheckpointManager.Config(
        items={"model": spec}, storage_config=LocalFileSystemStorageConfig(use_direct_io=False)
    )
    manager = CheckpointManager(config)
    try:
        future = manager.save(folder[0], {"model": model_state})
        if future is not None:
            future.result()
    except (AssertionError, RuntimeError) as exc:
        print(f"BUG: rank {rank}: {world}-rank save raised {type(exc).__name__}: {exc}", flush=True)
        return 1
    finally:
        manager.close()
    print(f"OK: rank {rank}: {world}-rank save wrote {folder[0]}", flush=True)
    return 0


if __name__ == "__main__":  # the library's writer process is spawned: it imports this file
    code = main()
    dist.destroy_process_group()
    sys.exit(code)
