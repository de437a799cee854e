"""Your own model, named in the config by import path: ``package.module:callable``.

The user's module provides (docs/extending.md, "Your own model"):
- ``callable(**kwargs) -> nn.Module``: builds the model (torch's RNG is seeded before the call);
- ``make_inputs(batch_size, generator) -> Tensor``: a batch of inputs (first dim ``batch_size``)
  drawn from ``generator`` only, so every layout sees the same batch;
- optional ``tp_plan(model) -> dict``: a ``parallelize_module`` plan, keys relative to the model
  (without one, TP layouts are ``skip``); the model's output must be whole on every TP rank;
- optional ``fsdp_units(model) -> list[nn.Module]``: the blocks FSDP wraps or shards one by one
  (default: the model's direct children that hold parameters).

``UserModel`` gives the user's module the pipeline's model interface (see ``models/__init__``);
its state entries are ``model.user_model.<fqn>``.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from types import ModuleType

import torch
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from pipeline_lib.errors import Incompatible
from pipeline_lib.models import UserModelError
from pipeline_lib.models._common import step_generator

REQUIRED_INPUTS = "make_inputs"


@dataclass(frozen=True)
class UserModelSource:
    """What ``models.get`` returns for an import path: ``build(**kwargs)`` like a model module."""

    name: str
    module: ModuleType
    factory: Callable[..., nn.Module]

    def build(self, **kwargs) -> UserModel:
        return UserModel(self.name, self.module, self.factory(**kwargs))


def load(name: str) -> UserModelSource:
    """Import ``package.module:callable`` and check the contract, or raise UserModelError."""
    module_name, _, attr = name.partition(":")
    # Import from the working directory too, as `python -m` (every worker rank) does: the
    # config check then sees the same modules as the jobs, also under `snakemake -d DIR`.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise UserModelError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UserModelError(f"{module_name!r} has no callable {attr!r}")
    if not callable(getattr(module, REQUIRED_INPUTS, None)):
        raise UserModelError(
            f"{module_name!r} has no {REQUIRED_INPUTS}(batch_size, generator) beside {attr!r}"
        )
    return UserModelSource(name, module, factory)


class UserModel(nn.Module):
    def __init__(self, name: str, source: ModuleType, user_model: nn.Module):
        super().__init__()
        self.name, self.source = name, source
        self.user_model = user_model

    def forward(self, inputs):
        return self.user_model(inputs)

    def make_batch(self, step: int, global_batch: int, seed: int):
        """(inputs, targets): the user's inputs; no targets, one placeholder per sample (the
        worker splits both over data-parallel ranks and counts the loss terms in targets)."""
        inputs = self.source.make_inputs(global_batch, step_generator(seed, step))
        if inputs.shape[0] != global_batch:
            raise ValueError(
                f"{self.name}: make_inputs({global_batch}, generator) returned a batch of "
                f"{inputs.shape[0]}"
            )
        return inputs, torch.zeros(global_batch)

    def loss_sum(self, outputs, targets):
        """Sum of the squared outputs per sample, summed over the samples: deterministic and
        depends on every output, which is all the pipeline needs from a loss."""
        return outputs.square().sum(), targets.numel()

    def fsdp_units(self):
        if hasattr(self.source, "fsdp_units"):
            return list(self.source.fsdp_units(self.user_model))
        return [m for m in self.user_model.children() if any(True for _ in m.parameters())]

    def tp_plan(self):
        if not hasattr(self.source, "tp_plan"):
            raise Incompatible(f"{self.name} has no tp_plan(model)")
        return {f"user_model.{key}": style for key, style in self._user_tp_plan().items()}

    def tp_dims(self):
        """{"<fqn>.<attribute>": size} of every Linear and Embedding dim the TP plan shards, so a
        TP degree that does not divide one is a skip instead of a crash."""
        if not hasattr(self.source, "tp_plan"):
            return {}
        dims = {}
        for key, style in self._user_tp_plan().items():
            for fqn, module in _plan_targets(self.user_model, key):
                attribute = _sharded_attribute(module, style)
                if attribute:
                    dims[f"{fqn}.{attribute}"] = getattr(module, attribute)
        return dims

    def _user_tp_plan(self) -> dict:
        return self.source.tp_plan(self.user_model)


def _plan_targets(model: nn.Module, key: str) -> list[tuple[str, nn.Module]]:
    """The submodules a plan key names; like parallelize_module, '*' matches within one atom."""
    atoms = key.split(".")
    return [
        (fqn, module)
        for fqn, module in model.named_modules()
        if len(fqn.split(".")) == len(atoms)
        and all(fnmatchcase(part, atom) for part, atom in zip(fqn.split("."), atoms, strict=True))
    ]


def _sharded_attribute(module: nn.Module, style) -> str | None:
    """The size attribute a Colwise or Rowwise style splits over the TP ranks (None: no split)."""
    colwise = isinstance(style, ColwiseParallel)
    if not colwise and not isinstance(style, RowwiseParallel):
        return None
    if isinstance(module, nn.Linear):
        return "out_features" if colwise else "in_features"
    if isinstance(module, nn.Embedding):
        return "embedding_dim" if colwise else "num_embeddings"
    return None
