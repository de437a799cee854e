"""FSDP2 over activation-checkpointed blocks, as torchtitan and accelerate apply it: each block
wrapped in ``checkpoint_wrapper`` (its state entries gain ``_checkpoint_wrapped_module.``, which
the state-dict API must remove), then fully_shard on each wrapper and the root
(``_activation_checkpoint``)."""

from pipeline_lib.frameworks import Framework
from pipeline_lib.frameworks._activation_checkpoint import checkpoint_blocks
from pipeline_lib.frameworks.fsdp2 import shard


def parallelize(model, mesh):
    return shard(model, mesh, units=checkpoint_blocks(model))


FRAMEWORK = Framework(
    name="fsdp2_activation_checkpoint",
    mesh_dims=("shard",),
    parallelize=parallelize,
    shards_meta_model=True,
)
