"""DistributedDataParallel over activation-checkpointed blocks, as torch's own state-dict tests
apply it (``apply_activation_checkpointing``, then DDP): entries gain
``module.`` and ``_checkpoint_wrapped_module.`` (``_activation_checkpoint``)."""

from pipeline_lib.frameworks import Framework
from pipeline_lib.frameworks._activation_checkpoint import checkpoint_blocks
from pipeline_lib.frameworks.ddp import parallelize as ddp


def parallelize(model, mesh):
    checkpoint_blocks(model)
    return ddp(model, mesh)


FRAMEWORK = Framework(
    name="ddp_activation_checkpoint", mesh_dims=("replicate",), parallelize=parallelize
)
