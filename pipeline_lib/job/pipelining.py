"""Pipeline parallelism (frameworks with a ``pp_dim``) with torch.distributed.pipelining.

The stage split is torchtitan's (``pipeline_module_split``): each rank's stage is the full
model with the modules of the other stages deleted (set to None; a layer of the layer stack
removed from its ModuleList, the others keeping their indices), so the stage's state entries
are the full model's names and the union of the stages' entries is the full model's. The model
names its parts in ``pipeline_split()``: (the layer stack's name, the modules before it, the
modules after it); its forward skips a part that is None (as torchtitan's models do). The
units (the part before, each layer, the part after) are split evenly, in order, over the
stages, the first stages taking one more where they do not divide.

A training step runs the layout's schedule (``ScheduleGPipe`` or ``Schedule1F1B``) over its
microbatches: the first stage takes the inputs, the last computes the loss of each microbatch
with the model's own ``loss_sum``, scaled as every other layout scales it (``scale_grads=False``:
the sum over microbatches is then the gradient of the global mean). Imports torch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint import CheckpointException

from pipeline_lib.common.errors import Incompatible, one_line
from pipeline_lib.common.layout import Layout
from pipeline_lib.models._common import split_batch


@dataclass(frozen=True)
class PipelineSettings:
    """A rank's place in the pipeline: its stage of ``stages``, the layout's schedule and
    microbatches, and the process group of its pipeline (the ranks of one data-parallel and
    tensor-parallel place, one per stage)."""

    stage: int
    stages: int
    schedule: str  # frameworks.PP_SCHEDULES
    microbatches: int
    group: Any  # ProcessGroup

    @classmethod
    def of(cls, layout: Layout, mesh, pp_dim: str) -> PipelineSettings:
        from pipeline_lib.frameworks import DEFAULT_MICROBATCHES, DEFAULT_PP_SCHEDULE

        return cls(
            stage=mesh.get_local_rank(pp_dim),
            stages=mesh[pp_dim].size(),
            schedule=layout.schedule or DEFAULT_PP_SCHEDULE,
            microbatches=layout.microbatches or DEFAULT_MICROBATCHES,
            group=mesh[pp_dim].get_group(),
        )


def stage_units(model: nn.Module, name: str, stages: int) -> list[list[str]]:
    """The model's units in forward order, each a list of module or parameter names: the part
    before the layer stack, each layer, the part after; Incompatible (a skip) when the model
    names no layer stack or has fewer units than stages."""
    split = getattr(model, "pipeline_split", None)
    found = split() if split is not None else None
    if found is None:
        raise Incompatible(f"{name} has no layer stack to split into pipeline stages")
    layers_name, before, after = found
    layers = model.get_submodule(layers_name)
    units = [list(before), *([f"{layers_name}.{i}"] for i, _ in layers.named_children())]
    units.append(list(after))
    if len(units) < stages:
        raise Incompatible(
            f"{stages} pipeline stages need {stages} units; {name} has {len(units)} "
            f"({len(units) - 2} layers, the part before them and the part after)"
        )
    return units


def stage_of(units: list, stage: int, stages: int) -> list:
    """The units of ``stage``: an even split in order, the first stages taking one more."""
    size, extra = divmod(len(units), stages)
    start = stage * size + min(stage, extra)
    return units[start : start + size + (stage < extra)]


def split(model: nn.Module, name: str, at: PipelineSettings) -> nn.Module:
    """The stage ``at.stage`` of ``model``, in place: every unit of the other stages deleted."""
    units = stage_units(model, name, at.stages)
    keep = {n for unit in stage_of(units, at.stage, at.stages) for n in unit}
    stand_in = getattr(model, "pipeline_stand_in", lambda: None)
    for unit in units:
        for part in unit:
            if part not in keep:
                _delete(model, part, stand_in())
    model.pipeline_stage = (at.stage, at.stages)
    return model


def _delete(model: nn.Module, name: str, stand_in: nn.Module | None) -> None:
    """Delete a module or parameter: None, or the model's parameterless ``stand_in`` for a
    module (nn.Identity, where the model's forward calls it anyway: transformers' models)."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if isinstance(parent, nn.ModuleList):
        delattr(parent, attr)  # the other layers keep their indices (their entries' names)
    elif attr in parent._parameters:
        parent.register_parameter(attr, None)
    else:
        setattr(parent, attr, stand_in)


@contextlib.contextmanager
def stages_agree(pipeline: bool):
    """Pipeline stages load different entries: one stage's load may fail where the others'
    succeed, and they would wait in the next collective. When one rank fails, every rank raises
    (the others name it); nothing to agree on for other layouts."""
    error = None
    try:
        yield
    except (Exception, CheckpointException) as exc:
        if not pipeline:
            raise
        error = exc
    if not pipeline:
        return
    every_rank = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, error and one_line(error))
    if error is not None:
        raise error
    failed = [(rank, why) for rank, why in enumerate(every_rank) if why]
    if failed:
        raise RuntimeError(f"rank {failed[0][0]} failed to load: {failed[0][1]}")


def loss_terms(targets) -> int:
    """A rank's number of loss terms, known before the last stage computes the loss: a user
    model's targets count them (``terms``); a tensor target has one per element (the built-in
    models' ``loss_sum``)."""
    terms = getattr(targets, "terms", None)
    return int(terms.sum()) if terms is not None else int(targets.numel())


class Pipeline:
    """A stage's ``PipelineStage`` and the layout's schedule over it."""

    def __init__(self, model: nn.Module, base: nn.Module, at: PipelineSettings, device):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        self.base, self.at = base, at
        stage = PipelineStage(model, at.stage, at.stages, device, group=at.group)
        kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[at.schedule]
        self.schedule = kind(stage, at.microbatches, loss_fn=self._loss, scale_grads=False)
        self._targets, self._scale, self._sums = None, 1.0, {}

    @property
    def is_first(self) -> bool:
        return self.at.stage == 0

    @property
    def is_last(self) -> bool:
        return self.at.stage == self.at.stages - 1

    def forward_backward(self, inputs, targets, scale: float) -> torch.Tensor:
        """One step's forward and backward over the microbatches; this rank's summed loss
        (zero off the last stage). ``scale``: what each microbatch's summed loss is scaled by
        before its backward."""
        rows = split_batch_rows(targets)
        self._targets, self._scale, self._sums = targets, scale, {}
        self._starts = [int(c[0]) for c in torch.arange(rows).tensor_split(self.at.microbatches)]
        # A dict of inputs (a user model's) as keyword arguments: stage arguments are tensors.
        args, named = (inputs,), {}
        if isinstance(inputs, dict):
            args, named = (), inputs
        if not self.is_first:
            args, named = (), {}
        target = torch.arange(rows) if self.is_last else None
        self.schedule.step(*args, target=target, **named)
        if not self._sums:
            return torch.zeros((), dtype=torch.float32)
        return torch.stack([self._sums[k] for k in sorted(self._sums)]).sum()

    def _loss(self, output, rows: torch.Tensor) -> torch.Tensor:
        """The loss of one microbatch (``rows``: its rows of the rank's batch). By microbatch:
        the first step's metadata inference calls it once more before the microbatches run."""
        index = self._starts.index(int(rows[0]))
        targets = split_batch(self._targets, self.at.microbatches, index)
        if isinstance(output, torch.Tensor):
            output = output.float()
        if hasattr(self.base, "stage_outputs"):  # a user model's: its loss as its forward's
            output = self.base.stage_outputs(output, targets)
        loss_sum, _ = self.base.loss_sum(output, targets)
        self._sums[index] = loss_sum.detach().float().cpu()
        return loss_sum * self._scale


def split_batch_rows(targets) -> int:
    """Rows (samples) of a rank's targets: a tensor's first dim, or a user model's samples."""
    return targets.shape[0] if isinstance(targets, torch.Tensor) else targets.samples
