"""3-D parallelism: pipeline stages (pipeline_lib.job.pipelining) on the outer mesh dim, FSDP2 on
the middle one, TP on the inner one (the model's TP plan, less the modules other stages hold)."""

from pipeline_lib.frameworks import Framework, fsdp2


def parallelize(model, mesh):
    from torch.distributed.tensor.parallel import parallelize_module

    parallelize_module(model, mesh["tp"], stage_plan(model, model.tp_plan()))
    return fsdp2.shard(model, mesh["dp"])


def stage_plan(model, plan: dict) -> dict:
    """A TP plan less the keys naming modules this stage does not hold."""
    return {key: style for key, style in plan.items() if _holds(model, key)}


def _holds(model, key: str) -> bool:
    """A plan key ('*' matches one name) names a module of this stage that holds parameters."""
    from pipeline_lib.models._user import _plan_targets

    return any(any(True for _ in m.parameters()) for _, m in _plan_targets(model, key))


FRAMEWORK = Framework(
    name="pp_fsdp2_tp",
    mesh_dims=("pp", "dp", "tp"),
    parallelize=parallelize,
    tp_dim="tp",
    pp_dim="pp",
)
