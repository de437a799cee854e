"""FSDP1 (FullyShardedDataParallel, FULL_SHARD), one FSDP unit per model block plus the root,
``use_orig_params=True`` (``fsdp1_flat``: the same with ``use_orig_params=False``)."""

from pipeline_lib.frameworks import Framework


def wrap(model, mesh, strategy_name: str, use_orig_params: bool = True):
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
        use_orig_params=use_orig_params,
    )


def parallelize(model, mesh):
    return wrap(model, mesh, "FULL_SHARD")


def flat_starts(model) -> dict[int, int | None]:
    """id(original parameter) -> where this rank's part starts in the parameter's elements
    (None: no part here). With use_orig_params each original parameter is a 1-D view of this
    rank's run of its elements; where the run starts is kept only in FSDP1's private
    ``FlatParameter._shard_param_infos`` (and ``_params``, the original parameters): the one
    private API the live state reads, for FSDP1 only."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    starts: dict[int, int | None] = {}
    for unit in FullyShardedDataParallel.fsdp_modules(model):
        if unit._handle is None:  # a unit that holds no parameters of its own
            continue
        flat = unit._handle.flat_param
        for param, info in zip(flat._params, flat._shard_param_infos, strict=True):
            starts[id(param)] = info.intra_param_start_idx if info.in_shard else None
    return starts


FRAMEWORK = Framework(
    name="fsdp1", mesh_dims=("shard",), parallelize=parallelize, flat_starts=flat_starts
)
