"""FSDP2 with MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32): the sharded
parameters (and the checkpoint) stay float32, forward and backward compute in bfloat16. Its
cells' resumed losses are judged with verify.resume_rtol_bfloat16."""

from pipeline_lib.frameworks import Framework
from pipeline_lib.frameworks.fsdp2 import shard


def parallelize(model, mesh):
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return shard(model, mesh, mp_policy=policy)


FRAMEWORK = Framework(
    name="fsdp2_mixed_precision",
    mesh_dims=("shard",),
    parallelize=parallelize,
    shards_meta_model=True,
    compute_dtype="bfloat16",
)
