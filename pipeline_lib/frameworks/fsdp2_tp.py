"""2-D parallelism: TP on the inner mesh dim, FSDP2 (fully_shard) on the outer one."""

from pipeline_lib.frameworks import Framework, fsdp2, tp


def parallelize(model, mesh):
    tp.parallelize(model, mesh["tp"])
    return fsdp2.shard(model, mesh["dp"])


FRAMEWORK = Framework(
    name="fsdp2_tp",
    mesh_dims=("dp", "tp"),
    parallelize=parallelize,
    tp_dim="tp",
)
