"""Models, one module each, registered by module name.

A model module defines ``build() -> torch.nn.Module``; the module it returns provides:
- ``forward(inputs)``;
- ``make_batch(step, global_batch, seed) -> (inputs, targets)``: the seeded global batch of a step
  (identical for every layout; each data-parallel rank takes its slice);
- ``loss_sum(outputs, targets) -> (summed loss, number of loss terms)``;
- ``fsdp_units()``: the blocks FSDP wraps or shards one by one (the root is always added);
- ``tp_plan()``: ``parallelize_module`` plan; ``tp_dims()``: {dim name: size} that the TP degree
  must divide (a layout that does not divide one becomes a ``skip`` cell).
"""

from __future__ import annotations

from types import ModuleType

from pipeline_lib.registry import load_module, module_names


def names() -> list[str]:
    return module_names(__name__)


def get(name: str) -> ModuleType:
    return load_module(__name__, name)
