"""Pipeline parallelism alone: each rank holds one stage of the model (its layers, the full
model's names; pipeline_lib.job.pipelining) and trains it under the layout's schedule."""

from pipeline_lib.frameworks import Framework


def parallelize(model, mesh):
    return model  # the stage: pipeline_lib.job.pipelining.split made it before


FRAMEWORK = Framework(name="pp", mesh_dims=("pp",), parallelize=parallelize, pp_dim="pp")
