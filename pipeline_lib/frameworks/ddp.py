"""DistributedDataParallel: every rank holds the whole model and optimizer state."""

from pipeline_lib.frameworks import Framework


def parallelize(model, mesh):
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, process_group=mesh.get_group())


FRAMEWORK = Framework(name="ddp", mesh_dims=("replicate",), parallelize=parallelize)
