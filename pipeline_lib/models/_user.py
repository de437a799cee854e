"""Your own model, named in the config by import path: ``package.module:callable``.

The user's module provides (docs/extending.md, "Your own model"):
- ``callable(**kwargs) -> nn.Module``: builds the model (torch's RNG is seeded before the call);
- ``make_inputs(batch_size, generator) -> Tensor | dict``: a batch of inputs (first dim
  ``batch_size``) drawn from ``generator`` only, so every layout sees the same batch; a dict is
  passed as keyword arguments (``input_ids``, ``attention_mask``, ``labels``, ...);
- optional ``loss(outputs, batch) -> Tensor``: the mean loss over the batch's samples, used when
  the model returns no loss of its own;
- optional ``tp_plan(model) -> dict``: a ``parallelize_module`` plan, keys relative to the model
  (without one, TP layouts are ``skip``); the model's output must be whole on every TP rank;
- optional ``fsdp_units(model) -> list[nn.Module]``: the blocks FSDP wraps or shards one by one
  (default: the model's direct children that hold parameters);
- optional ``tp_dims(model) -> dict``: {name: size} the TP degree must divide because the model's
  own arithmetic needs whole parts on each TP rank (attention heads).

The forward may return a tensor, a tuple, a dict or a transformers ``ModelOutput``. The loss
(``UserModel.loss_sum``, docs/extending.md): the model's own (``outputs.loss``), else the
module's ``loss``, else the sum of squares of the first floating tensor output.

``UserModel`` gives the user's module the pipeline's model interface (see ``models/__init__``);
its state entries are ``model.user_model.<fqn>``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from types import ModuleType
from typing import Any

import torch
from torch import nn

from pipeline_lib.common.errors import Incompatible
from pipeline_lib.common.registry import import_path
from pipeline_lib.models import UserModelError
from pipeline_lib.models._common import batch_to, split_batch, step_generator

REQUIRED_INPUTS = "make_inputs"
# Where a cell's loss came from (the save record's and matrix's loss_source).
LOSS_SOURCES = ("model", "user", "fallback")
# Label value transformers' losses ignore.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class UserModelSource:
    """What ``models.get`` returns for an import path: ``build(**kwargs)`` like a model module."""

    name: str
    module: ModuleType
    factory: Callable[..., nn.Module]

    def build(self, **kwargs) -> UserModel:
        return UserModel(self.name, self.module, self.factory(**kwargs))


def load(name: str) -> UserModelSource:
    """Import ``package.module:callable`` and check the contract, or raise UserModelError. The
    module must be one of your own and the callable a plain function or a class defined in it
    (pipeline_lib.common.registry: not a built-in, nor the standard library's or an installed
    package's, which a config could otherwise name to have it called)."""
    module_name, _, attr = name.partition(":")
    module, factory = import_path(name, UserModelError, classes=True)
    if not callable(getattr(module, REQUIRED_INPUTS, None)):
        raise UserModelError(
            f"{module_name!r} has no {REQUIRED_INPUTS}(batch_size, generator) beside {attr!r}"
        )
    return UserModelSource(name, module, factory)


@dataclass(frozen=True)
class UserTargets:
    """What the loss needs beside the outputs: the batch (the module's ``loss`` reads it) and
    each sample's number of terms in the model's own loss (summed: the terms of a split)."""

    batch: Any  # Tensor | dict[str, Tensor]
    terms: torch.Tensor  # [samples], int64

    def split(self, parts: int, index: int) -> UserTargets:
        return UserTargets(
            split_batch(self.batch, parts, index), self.terms.tensor_split(parts)[index]
        )

    def moved(self, device: torch.device, float_dtype: torch.dtype) -> UserTargets:
        return UserTargets(batch_to(self.batch, device, float_dtype), self.terms)

    @property
    def samples(self) -> int:
        return int(self.terms.numel())


class UserModel(nn.Module):
    def __init__(self, name: str, source: Any, user_model: nn.Module):
        """``source``: the user's module, or an object with the same functions (models._hf)."""
        super().__init__()
        self.name, self.source = name, source
        self.user_model = user_model
        self.loss_source: str | None = None  # set by loss_sum: one of LOSS_SOURCES

    def forward(self, inputs=None, **named):
        # A pipeline stage gets a dict of inputs as keyword arguments (pipeline_lib.job.pipelining).
        inputs = named or inputs
        if getattr(self, "pipeline_stage", None) and hasattr(self.source, "stage_forward"):
            return self.source.stage_forward(self.user_model, inputs)
        if isinstance(inputs, dict):
            return self.user_model(**inputs)
        return self.user_model(inputs)

    def make_batch(self, step: int, global_batch: int, seed: int):
        """(inputs, UserTargets): the user's inputs, and what the loss needs (the worker splits
        both over data-parallel ranks on dim 0)."""
        inputs = self.source.make_inputs(global_batch, step_generator(seed, step))
        for key, value in _tensors(inputs, self.name):
            if value.dim() == 0 or value.shape[0] != global_batch:
                raise ValueError(
                    f"{self.name}: make_inputs({global_batch}, generator) returned a batch of "
                    f"{tuple(value.shape)[:1] or 'a scalar'}{key}"
                )
        return inputs, UserTargets(inputs, model_loss_terms(self.user_model, inputs, global_batch))

    def loss_sum(self, outputs, targets: UserTargets):
        """(summed loss, number of loss terms) of this rank's part of the batch: the model's own
        loss (a mean over its terms) times its terms, else the module's ``loss`` (a mean over
        the samples) times the samples, else the sum of the squared first floating output per
        sample (deterministic and depends on every output: all the checks need)."""
        own = model_loss(outputs)
        if own is not None:
            self.loss_source = "model"
            terms = int(targets.terms.sum())
            return own.float() * terms, terms
        if callable(getattr(self.source, "loss", None)):
            self.loss_source = "user"
            mean = self.source.loss(outputs, targets.batch).float()
            return mean * targets.samples, targets.samples
        self.loss_source = "fallback"
        return first_float(outputs, self.name).float().square().sum(), targets.samples

    def pipeline_split(self):
        """The user's ``pipeline_split(model)`` (names relative to the user's model), or None:
        no layer stack to split into pipeline stages (pipeline_lib.job.pipelining)."""
        if not hasattr(self.source, "pipeline_split"):
            return None
        found = self.source.pipeline_split(self.user_model)
        if found is None:
            return None
        layers, before, after = found
        prefixed = [f"user_model.{n}" for n in before], [f"user_model.{n}" for n in after]
        return f"user_model.{layers}", *prefixed

    def pipeline_stand_in(self):
        return (
            self.source.pipeline_stand_in() if hasattr(self.source, "pipeline_stand_in") else None
        )

    def stage_outputs(self, outputs, targets: UserTargets):
        """The last pipeline stage's outputs as the forward returns them (its own loss)."""
        if hasattr(self.source, "stage_outputs"):
            return self.source.stage_outputs(self.user_model, outputs, targets.batch)
        return outputs

    def fsdp_units(self):
        if hasattr(self.source, "fsdp_units"):
            return list(self.source.fsdp_units(self.user_model))
        return [m for m in self.user_model.children() if any(True for _ in m.parameters())]

    def tp_plan(self):
        if not hasattr(self.source, "tp_plan"):
            raise Incompatible(f"{self.name} has no tp_plan(model)")
        return {f"user_model.{key}": style for key, style in self._user_tp_plan().items()}

    def tp_dims(self):
        """The module's own ``tp_dims``: sizes its arithmetic needs whole on each TP rank
        (heads). The Linear and Embedding sizes the TP plan shards are torch's to shard
        unevenly: a TP degree that does not divide one runs, and torch's error is the verdict.
        A plan that cannot apply gives none: TP layouts skip it anyway, with the plan's reason."""
        if not hasattr(self.source, "tp_plan") or not hasattr(self.source, "tp_dims"):
            return {}
        try:
            self._user_tp_plan()
        except Incompatible:
            return {}
        return dict(self.source.tp_dims(self.user_model))

    def ep_plan(self):
        """The source's ``ep_plan(model)`` (models._hf: transformers' expert parallelism), keys
        under ``user_model.``; none without one (expert-parallel layouts are then ``skip``)."""
        if not hasattr(self.source, "ep_plan"):
            return {}
        plan = self.source.ep_plan(self.user_model)
        return {f"user_model.{key}": style for key, style in plan.items()}

    def _user_tp_plan(self) -> dict:
        return self.source.tp_plan(self.user_model)


def _tensors(batch, name: str) -> list[tuple[str, torch.Tensor]]:
    """(" (key)", tensor) of every tensor of a batch: a tensor or a dict holding tensors."""
    if isinstance(batch, torch.Tensor):
        return [("", batch)]
    if isinstance(batch, dict):
        found = [(f" ({k})", v) for k, v in batch.items() if isinstance(v, torch.Tensor)]
        if found:
            return found
    raise ValueError(f"{name}: make_inputs must return a tensor or a dict holding tensors")


# transformers' causal LMs: their loss predicts token i + 1 from the tokens up to i.
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def is_causal_lm(model: nn.Module) -> bool:
    """A transformers causal LM (by its class name: transformers is not imported here)."""
    return type(model).__name__.endswith(CAUSAL_LM_SUFFIXES)


def model_loss_terms(model: nn.Module, batch, samples: int) -> torch.Tensor:
    """Each sample's number of terms in the model's own loss: for a transformers causal LM given
    ``labels``, its labels that are not -100 after the shift by one token (the loss predicts
    token i + 1 from tokens up to i); else one per sample (a mean over the samples)."""
    labels = batch.get("labels") if isinstance(batch, dict) else None
    if labels is not None and is_causal_lm(model):
        return (labels[:, 1:] != IGNORE_INDEX).reshape(samples, -1).sum(dim=1)
    return torch.ones(samples, dtype=torch.int64)


def model_loss(outputs) -> torch.Tensor | None:
    """The loss a model returned with its outputs (``outputs.loss`` or ``outputs["loss"]``)."""
    if isinstance(outputs, (torch.Tensor, tuple, list)):
        return None
    loss = outputs.get("loss") if isinstance(outputs, dict) else getattr(outputs, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else None


def first_float(outputs, name: str = "model") -> torch.Tensor:
    """The first floating tensor of the outputs: a tensor, or the first in a tuple, list or
    dict (a ``ModelOutput`` is one, in field order), depth first."""
    found = _first_float(outputs)
    if found is None:
        raise ValueError(f"{name}: the forward returned no floating tensor to take a loss of")
    return found


def _first_float(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value if value.is_floating_point() else None
    parts = value.values() if isinstance(value, dict) else value
    if not isinstance(value, (dict, tuple, list)):
        return None
    for part in parts:
        if (found := _first_float(part)) is not None:
            return found
    return None


def _plan_targets(model: nn.Module, key: str) -> list[tuple[str, nn.Module]]:
    """The submodules a plan key names; like parallelize_module, '*' matches within one atom."""
    atoms = key.split(".")
    return [
        (fqn, module)
        for fqn, module in model.named_modules()
        if len(fqn.split(".")) == len(atoms)
        and all(fnmatchcase(part, atom) for part, atom in zip(fqn.split("."), atoms, strict=True))
    ]
