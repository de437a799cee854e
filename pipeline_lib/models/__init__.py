"""Models, one module each, registered by module name; or your own, named by import path
(``package.module:callable``, adapted by ``_user``).

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
from typing import TYPE_CHECKING

from pipeline_lib.registry import load_module, module_names

if TYPE_CHECKING:
    from pipeline_lib.models._user import UserModelSource


class UserModelError(ValueError):
    """An import-path model cannot be used; the message says why."""


def names() -> list[str]:
    """The built-in models."""
    return module_names(__name__)


def is_import_path(name: str) -> bool:
    return ":" in name


def get(name: str) -> ModuleType | UserModelSource:
    """The model's module, or for an import path its UserModelSource: both have
    ``build(**kwargs)``. An unusable import path raises UserModelError."""
    if is_import_path(name):
        from pipeline_lib.models import _user  # imports torch: only for your own model

        return _user.load(name)
    return load_module(__name__, name)
