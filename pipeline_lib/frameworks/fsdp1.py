"""FSDP1 (FullyShardedDataParallel, FULL_SHARD), one FSDP unit per model block plus the root."""

from pipeline_lib.frameworks import Framework


def wrap(model, mesh, strategy_name: str):
    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    unit_types = {type(unit) for unit in model.fsdp_units()}
    device = next(model.parameters()).device
    return FullyShardedDataParallel(
        model,
        sharding_strategy=ShardingStrategy[strategy_name],
        auto_wrap_policy=ModuleWrapPolicy(unit_types) if unit_types else None,
        device_mesh=mesh,
        # The CPU device must be named explicitly, or FSDP1 looks for an accelerator.
        device_id=device if device.type == "cuda" else torch.device("cpu"),
        use_orig_params=True,
    )


def parallelize(model, mesh):
    return wrap(model, mesh, "FULL_SHARD")


FRAMEWORK = Framework(name="fsdp1", mesh_dims=("shard",), parallelize=parallelize)
