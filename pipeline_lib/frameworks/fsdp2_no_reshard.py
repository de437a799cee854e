"""FSDP2 with reshard_after_forward=False: parameters stay unsharded from forward to backward
(ZeRO-2-like), the option that changes when FSDP2 swaps its sharded and unsharded views."""

from pipeline_lib.frameworks import Framework
from pipeline_lib.frameworks.fsdp2 import shard


def parallelize(model, mesh):
    return shard(model, mesh, reshard_after_forward=False)


FRAMEWORK = Framework(
    name="fsdp2_no_reshard", mesh_dims=("shard",), parallelize=parallelize, shards_meta_model=True
)
