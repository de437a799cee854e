"""One process, the plain module: the reference layout every other layout is compared with."""

from pipeline_lib.frameworks import Framework


def parallelize(model, mesh):
    return model


FRAMEWORK = Framework(
    name="single", mesh_dims=("world",), parallelize=parallelize, max_world_size=1
)
