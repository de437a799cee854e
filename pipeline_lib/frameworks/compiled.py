"""One process, the model compiled with ``torch.compile`` (inductor, the default backend): its
state entries gain ``_orig_mod.``, which the state-dict API must remove."""

from pipeline_lib.frameworks import Framework


def parallelize(model, mesh):
    import torch

    return torch.compile(model)


FRAMEWORK = Framework(
    name="compiled", mesh_dims=("world",), parallelize=parallelize, max_world_size=1
)
