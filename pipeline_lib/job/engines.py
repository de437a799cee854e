"""The torch_checkpointing engine (axis ``engine``): Meta's torch-checkpointing library saves
and loads a job's state through its ``CheckpointManager``, the way its README and torchtitan's
backend for it configure one: ``model`` and ``optim`` each an ``ItemSpec`` with the library's
``DefaultResharder`` (DTensor resharding on load), the LR scheduler's state an item with the
default spec. Imported only for a cell of that engine (the library is an optional extra:
requirements-torch-checkpointing.txt); engine dcp is pipeline_lib.job.checkpoint_io's.

Two choices differ from the library's defaults. Its synchronous saver
(``SyncCheckpointSaverConfig``), not its asynchronous one: each manager of the asynchronous
saver starts a writer process when it is made (``mp.spawn``: a fresh Python importing torch,
about 10 s of a 2-core machine per save and per load); the synchronous one runs the same
``CheckpointWriter`` in the training process. The asynchronous save is not tested here. And
direct I/O is off (``LocalFileSystemStorageConfig(use_direct_io=False)``). With it on, the
writer opens each file with O_DIRECT and writes unaligned buffers through a buffered file
object: on ext4 every save fails in close() with ``OSError: [Errno 22] Invalid argument``
(docs/findings.md, reproducer scripts/repro/torch_checkpointing_direct_io.py); off, it writes
with buffered I/O.
"""

from __future__ import annotations

import time

from pipeline_lib.plan.specs import CheckpointPaths
from pipeline_lib.verify.results import Timing

# The items of a checkpoint that hold DTensors (given the resharder); the others (the LR
# scheduler's state) are plain values every rank holds alike.
RESHARDED = ("model", "optim")


def config():
    """The CheckpointManager's config this module's docstring says."""
    from torch_checkpointing import CheckpointManager, ItemSpec
    from torch_checkpointing.config import SyncCheckpointSaverConfig
    from torch_checkpointing.default_resharder import DefaultResharder
    from torch_checkpointing.storage.filesystem import LocalFileSystemStorageConfig

    resharded = ItemSpec(resharder=DefaultResharder())
    return CheckpointManager.Config(
        items={key: resharded for key in RESHARDED},
        save=SyncCheckpointSaverConfig(),
        storage_config=LocalFileSystemStorageConfig(use_direct_io=False),
    )


def manager():
    """A CheckpointManager of ``config()``. Its owner closes it."""
    from torch_checkpointing import CheckpointManager

    return CheckpointManager(config())


def _payload(state: dict) -> dict:
    """``state`` as the library's plain-dict payload: Stateful entries as their state dicts."""
    return {k: v if k in RESHARDED else v.state_dict() for k, v in state.items()}


def write(state: dict, paths: CheckpointPaths, timing: Timing):
    """Save ``state`` into ``paths.checkpoint``; returns a wait() that blocks until the
    background write is durable (and closes the manager). ``timing`` as checkpoint_io.write."""
    started = time.perf_counter()
    saver = manager()
    try:
        future = saver.save(paths.checkpoint, _payload(state))
    except BaseException:
        saver.close()
        raise
    timing.save_blocked_s = timing.save_s = time.perf_counter() - started

    def wait() -> None:
        try:
            if future is not None:
                future.result()
        finally:
            saver.close()
        timing.save_s = time.perf_counter() - started

    return wait


def read(trainee, state: dict, paths: CheckpointPaths, opts) -> None:
    """Load the checkpoint at ``paths`` into the loader's state dict ``state`` (its tensors and
    DTensors in place, resharded by the library), then into the trainee's model and optimizer
    with set_state_dict (``opts``: the load side's StateDictOptions), and the Stateful entries."""
    from dataclasses import replace

    from torch.distributed.checkpoint.state_dict import set_state_dict

    loader = manager()
    try:
        loaded = loader.load(paths.checkpoint, into=_payload(state))
    finally:
        loader.close()
    set_state_dict(
        trainee.model,
        trainee.optimizer,
        model_state_dict=loaded["model"],
        optim_state_dict=loaded["optim"],
        options=replace(opts, strict=not opts.ignore_frozen_params),
    )
    for key, target in state.items():
        if key not in RESHARDED:
            target.load_state_dict(loaded[key])
