"""FSDP2: fully_shard on every model block, then on the root."""

from pipeline_lib.frameworks import Framework


def shard(model, mesh, units=None, **options):
    """fully_shard on every unit (default: the model's blocks), then on the root; ``options``
    are fully_shard's (reshard_after_forward, offload_policy, mp_policy)."""
    from torch.distributed.fsdp import fully_shard

    for unit in model.fsdp_units() if units is None else units:
        fully_shard(unit, mesh=mesh, **options)
    fully_shard(model, mesh=mesh, **options)
    return model


FRAMEWORK = Framework(name="fsdp2", mesh_dims=("shard",), parallelize=shard, shards_meta_model=True)
