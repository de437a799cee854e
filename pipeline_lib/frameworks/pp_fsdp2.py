"""Pipeline parallelism x FSDP2: each stage (pipeline_lib.job.pipelining) fully_shard-ed over the
data-parallel dim, as torchtitan applies it."""

from pipeline_lib.frameworks import Framework, fsdp2


def parallelize(model, mesh):
    return fsdp2.shard(model, mesh["dp"])


FRAMEWORK = Framework(
    name="pp_fsdp2",
    mesh_dims=("pp", "dp"),
    parallelize=parallelize,
    shards_meta_model=True,
    pp_dim="pp",
)
