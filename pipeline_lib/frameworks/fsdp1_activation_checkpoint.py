"""FSDP1 (as ``fsdp1``: FULL_SHARD, one unit per block, ``use_orig_params=True``) with
activation checkpointing applied afterwards on each block inside its unit, as accelerate and the
HF Trainer do (``fsdp_config.activation_checkpointing``): entries gain
``_fsdp_wrapped_module._checkpoint_wrapped_module.`` (``_activation_checkpoint``)."""

from pipeline_lib.frameworks import Framework
from pipeline_lib.frameworks._activation_checkpoint import checkpoint_blocks
from pipeline_lib.frameworks.fsdp1 import flat_starts, wrap


def parallelize(model, mesh):
    blocks = model.fsdp_units()
    wrapped = wrap(model, mesh, "FULL_SHARD")
    checkpoint_blocks(wrapped, blocks)
    return wrapped


FRAMEWORK = Framework(
    name="fsdp1_activation_checkpoint",
    mesh_dims=("shard",),
    parallelize=parallelize,
    flat_starts=flat_starts,
)
