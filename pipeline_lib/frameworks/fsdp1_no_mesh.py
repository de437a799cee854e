"""FSDP1 (FULL_SHARD, ``use_orig_params=True``, one unit per model block plus the root, as
``fsdp1``) built without a device mesh, on the default process group, as accelerate and older
trainers build it: its sharded state dict holds ShardedTensors, not DTensors."""

from pipeline_lib.frameworks import Framework
from pipeline_lib.frameworks.fsdp1 import flat_starts, wrap


def parallelize(model, mesh):
    return wrap(model, None, "FULL_SHARD")


FRAMEWORK = Framework(
    name="fsdp1_no_mesh", mesh_dims=("shard",), parallelize=parallelize, flat_starts=flat_starts
)
