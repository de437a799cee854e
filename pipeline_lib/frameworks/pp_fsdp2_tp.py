"""3-D parallelism: pipeline stages (pipeline_lib.pipelining) on the outer mesh dim, FSDP2 on
the middle one, TP on the inner one (the model's TP plan, less the modules other stages hold)."""

from pipeline_lib.frameworks import Framework, fsdp2


def parallelize(model, mesh):
    from torch.distributed.tensor.parallel import parallelize_module

    from pipeline_lib.pipelining import stage_plan

    parallelize_module(model, mesh["tp"], stage_plan(model, model.tp_plan()))
    return fsdp2.shard(model, mesh["dp"])


FRAMEWORK = Framework(
    name="pp_fsdp2_tp",
    mesh_dims=("pp", "dp", "tp"),
    parallelize=parallelize,
    tp_dim="tp",
    pp_dim="pp",
)
