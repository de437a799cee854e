"""Reproducer (torch and torch-checkpointing 0.1.1 only): an item without a resharder, saved by
1 rank, loaded by 2 ranks.

torch-checkpointing's ``CheckpointManager`` stores an item whose ``ItemSpec`` has no resharder
(here an LR scheduler's state, declared as torchtitan's backend declares its non-model items)
once per rank: ``scheduler_<rank>.pt``. A checkpoint saved by 1 rank holds ``scheduler_0.pt``
only, so it cannot load into 2 ranks; and the load fails on rank 1 alone: rank 1 raises
``FileNotFoundError: Missing file …/scheduler_1.pt for checkpoint item 'scheduler'`` while rank
0's load returns (DCP's ``dcp.load`` raises its ``CheckpointException`` on every rank). A
trainer's rank 0 then goes on to its next collective and waits for rank 1 (the pipeline's cells:
``error`` naming rank 1's exception, once its watchdog has seen 20 s without progress). The
model item, with the library's ``DefaultResharder``, loads on both ranks.

Run from anywhere (CPU, gloo; torch 2.13.0+cpu; `bash scripts/setup.sh --torch-checkpointing`):
    torchrun --nproc-per-node 1 scripts/repro/torch_checkpointing_rank_item.py save DIR
    torchrun --nproc-per-node 2 scripts/repro/torch_checkpointing_rank_item.py load DIR   # BUG
The load prints, per rank, what it raised or that it loaded; BUG and exit 1 where one rank
raised and another loaded (measured: rank 1 raises, rank 0 loads). Loaded by 1 rank
(``--nproc-per-node 1 ... load DIR``) it prints OK and exits 0.
"""

import datetime
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch_checkpointing import CheckpointManager, ItemSpec
from torch_checkpointing.default_resharder import DefaultResharder
from torch_checkpointing.storage.filesystem import LocalFileSystemStorageConfig


def manager() -> CheckpointManager:
    # Direct I/O off: on ext4 it fails on its own (torch_checkpointing_direct_io.py).
    config = CheckpointManager.Config(
        items={"model": ItemSpec(resharder=DefaultResharder())},
        storage_config=LocalFileSystemStorageConfig(use_direct_io=False),
    )
    return CheckpointManager(config)


def state(world: int) -> dict:
    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    if world > 1:
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    return {"model": get_model_state_dict(model), "scheduler": scheduler.state_dict()}


def main(action: str, folder: str) -> int:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    payload, checkpoints = state(world), manager()
    try:
        if action == "save":
            checkpoints.save(folder, payload)
            print(f"OK: rank {rank}: {world}-rank save wrote {folder}", flush=True)
            return 0
        raised = ""
        try:
            checkpoints.load(folder, into=payload)
            print(f"rank {rank}: loaded", flush=True)
        except FileNotFoundError as exc:
            raised = f"{type(exc).__name__}: {exc}"
            print(f"rank {rank}: raised {raised}", flush=True)
        # Only to report (a trainer would be in its next collective by now): what each rank got.
        outcomes = [None] * world
        dist.all_gather_object(outcomes, raised)
        if rank == 0 and any(outcomes) and not all(outcomes):
            failed = [r for r, o in enumerate(outcomes) if o]
            print(f"BUG: ranks {failed} raised, the others loaded: {outcomes[failed[0]]}")
        elif rank == 0:
            print(f"OK: {world}-rank load: {'every rank raised' if any(outcomes) else 'loaded'}")
        sys.stdout.flush()
        return 1 if any(outcomes) and not all(outcomes) else 0
    finally:
        checkpoints.close()


if __name__ == "__main__":
    code = main(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    sys.exit(code)
