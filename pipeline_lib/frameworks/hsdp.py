"""HSDP with FSDP2: fully_shard on a (replicate, shard) mesh."""

from pipeline_lib.frameworks import Framework
from pipeline_lib.frameworks.fsdp2 import shard

FRAMEWORK = Framework(
    name="hsdp", mesh_dims=("replicate", "shard"), parallelize=shard, shards_meta_model=True
)
