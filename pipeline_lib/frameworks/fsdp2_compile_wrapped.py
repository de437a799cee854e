"""FSDP2 over blocks compiled one by one the way torchtitan did before ``nn.Module.compile``
(and many trainers still do): ``torch.compile(block, fullgraph=True)`` returns an
``OptimizedModule``, re-registered in the block's place, then ``fully_shard`` on each compiled
block and the root. Entries gain ``_orig_mod.`` in the middle of their names
(``blocks.0._orig_mod.fc1.weight``), which the state-dict API must remove. Slow on CPU, as
``fsdp2_compile``."""

from pipeline_lib.frameworks import Framework
from pipeline_lib.frameworks.fsdp2 import shard


def compile_blocks(model) -> list:
    """Each block replaced in its parent by ``torch.compile(block)``; the compiled blocks."""
    import torch

    blocks = {id(block) for block in model.fsdp_units()}
    compiled = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in blocks:
                parent.register_module(name, torch.compile(child, fullgraph=True))
                compiled.append(getattr(parent, name))
    return compiled


def parallelize(model, mesh):
    return shard(model, mesh, units=compile_blocks(model))


FRAMEWORK = Framework(
    name="fsdp2_compile_wrapped",
    mesh_dims=("shard",),
    parallelize=parallelize,
    shards_meta_model=True,
)
