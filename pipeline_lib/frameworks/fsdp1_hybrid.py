"""FSDP1 HYBRID_SHARD on a 2-D mesh: shard within the inner dim, replicate across the outer."""

from pipeline_lib.frameworks import Framework
from pipeline_lib.frameworks.fsdp1 import flat_starts, wrap


def parallelize(model, mesh):
    return wrap(model, mesh, "HYBRID_SHARD")


FRAMEWORK = Framework(
    name="fsdp1_hybrid",
    mesh_dims=("replicate", "shard"),
    parallelize=parallelize,
    flat_starts=flat_starts,
)
