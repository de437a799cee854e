"""FSDP2: fully_shard on every model block, then on the root."""

from pipeline_lib.frameworks import Framework


def shard(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for unit in model.fsdp_units():
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


FRAMEWORK = Framework(name="fsdp2", mesh_dims=("shard",), parallelize=shard, shards_meta_model=True)
