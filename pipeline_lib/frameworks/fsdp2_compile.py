"""FSDP2 over blocks compiled one by one, as torchtitan 0.3.0 compiles (``apply_compile``): each
block compiled in place with ``nn.Module.compile(fullgraph=True)`` (inductor, the default
backend) before ``fully_shard`` on each block and the root. In-place compilation keeps the
module tree, so no entry gains ``_orig_mod.`` (``compiled``, ``torch.compile(model)``, does).
On CPU, inductor compiles C++ (gcc) the first time each graph runs: slow, so its cells are in
``configs/seeds.yaml``, not in the default matrix."""

from pipeline_lib.frameworks import Framework
from pipeline_lib.frameworks.fsdp2 import shard


def parallelize(model, mesh):
    for block in model.fsdp_units():
        block.compile(fullgraph=True)
    return shard(model, mesh)


FRAMEWORK = Framework(
    name="fsdp2_compile", mesh_dims=("shard",), parallelize=parallelize, shards_meta_model=True
)
