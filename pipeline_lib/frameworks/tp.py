"""Tensor parallelism: parallelize_module with the model's own TP plan."""

from pipeline_lib.frameworks import Framework


def parallelize(model, mesh):
    from torch.distributed.tensor.parallel import parallelize_module

    return parallelize_module(model, mesh, model.tp_plan())


FRAMEWORK = Framework(name="tp", mesh_dims=("tp",), parallelize=parallelize, tp_dim="tp")
