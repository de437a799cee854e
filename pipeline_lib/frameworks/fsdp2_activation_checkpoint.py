"""FSDP2 over activation-checkpointed blocks, as torchtitan and accelerate apply it: each block
wrapped in ``checkpoint_wrapper`` (its state entries gain ``_checkpoint_wrapped_module.``, which
the state-dict API must remove), then fully_shard on each wrapper and the root.
``checkpoint_wrapper`` lives in ``torch.distributed.algorithms._checkpoint`` (a private module
path, the one those trainers import; docs/torch-notes.md)."""

from pipeline_lib.frameworks import Framework
from pipeline_lib.frameworks.fsdp2 import shard


def parallelize(model, mesh):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointWrapper,
        apply_activation_checkpointing,
    )

    blocks = {id(unit) for unit in model.fsdp_units()}
    apply_activation_checkpointing(model, check_fn=lambda module: id(module) in blocks)
    wrappers = [m for m in model.modules() if isinstance(m, CheckpointWrapper)]
    return shard(model, mesh, units=wrappers)


FRAMEWORK = Framework(
    name="fsdp2_activation_checkpoint",
    mesh_dims=("shard",),
    parallelize=parallelize,
    shards_meta_model=True,
)
