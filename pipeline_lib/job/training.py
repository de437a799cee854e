"""A job's item as a rank trains it: the model under the layout, its optimizer and scheduler
(``build``), deterministic training steps on the shared global batches (``train``), and its
state seen two ways: through torch's state-dict API (``state_dict``) and from the live objects
(``live``). Imports torch; every function runs on all ranks of a job.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict

from pipeline_lib import models
from pipeline_lib.common.errors import Incompatible
from pipeline_lib.frameworks import Framework
from pipeline_lib.job import checkpoint_io, histories, legacy_fsdp, optimizers, pipelining
from pipeline_lib.models._common import batch_to, split_batch
from pipeline_lib.plan.axes import Variant
from pipeline_lib.plan.specs import ItemSpec
from pipeline_lib.verify import faults
from pipeline_lib.verify.entries import UNEXPECTED_ENTRY, flatten_with_empty
from pipeline_lib.verify.live import Anatomy, live_state

# The loader's model starts from a different init, so an entry the load misses cannot pass.
LOADER_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class Item:
    """One (variant, model) of a job as a rank runs it: its spec and the model's module. What
    the worker changes for a step (an existing checkpoint's mode, a save sequence's paths and
    loaded step) is a new item of a changed spec (``changed``): ``variant``, ``train`` and
    ``id`` are always the spec's."""

    spec: ItemSpec
    model_module: Any  # models.get's answer: has build(**model_kwargs)

    @classmethod
    def of(cls, spec: ItemSpec) -> Item:
        return cls(spec, models.get(spec.model, spec.model_kwargs))

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def train(self) -> dict:
        return self.spec.train

    @property
    def variant(self) -> Variant:
        return self.spec.variant

    def changed(self, **spec_fields) -> Item:
        """This item with ``spec_fields`` of its spec replaced."""
        return replace(self, spec=replace(self.spec, **spec_fields))

    def in_mode(self, mode: str) -> Item:
        """This item with the state-dict mode ``mode`` (an existing checkpoint's own)."""
        return self.changed(variant=replace(self.variant, mode=mode))


@dataclass(frozen=True)
class Placement:
    """Where a rank trains: its device, the layout's framework and mesh, and its place in the
    data-parallel and tensor-parallel groups."""

    device: torch.device
    framework: Framework
    mesh: Any  # DeviceMesh
    dp_rank: int
    dp_size: int
    tp_degree: int
    pipeline: pipelining.PipelineSettings | None = None  # pipeline-parallel layouts only

    @property
    def pp_degree(self) -> int:
        return self.pipeline.stages if self.pipeline else 1


@dataclass
class Trainee:
    model: torch.nn.Module  # wrapped by the layout's framework
    base: torch.nn.Module  # the model module's own object (make_batch, loss_sum)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    anatomy: Anatomy  # the model's state entries, from the unwrapped module
    at_build: dict = field(default_factory=dict)  # fault stale_param: the state at build
    pipeline: pipelining.Pipeline | None = None  # the stage's schedule (pipeline parallelism)
    # The state leaves out the frozen parameters (ignore_frozen_params; Variant.ignores_frozen).
    ignores_frozen: bool = False

    @property
    def param_names(self) -> set[str]:
        """Parameter names and the model state keys that hold a parameter (a renamed one's)."""
        return set(self.anatomy.shapes) | self.anatomy.param_keys

    @property
    def frozen(self) -> frozenset[str]:
        """Frozen parameters (saved and loaded with ignore_frozen_params)."""
        return self.anatomy.frozen


def build(
    item: Item,
    at: Placement,
    seed: int,
    meta: bool = False,
    fault=None,
    base_seed=None,
    loader: bool = False,
) -> Trainee:
    """The item's model, of its variant's dtype, under the layout, its optimizer and scheduler.
    ``meta``: built on the meta device and materialized empty (no values until a load).
    ``base_seed``: the seed of a LoRA model's base where it is not ``seed`` (``base_seed``).
    ``loader``: brought to the saver's parameters and param groups at its save (its history,
    pipeline_lib.job.histories)."""
    torch.manual_seed(seed)
    # model_kwargs (benchmarks only) resize a model, e.g. a 1 GB mlp.
    kwargs = dict(item.spec.model_kwargs)
    if base_seed is not None:
        kwargs["base_seed"] = base_seed
    with torch.device("meta") if meta else contextlib.nullcontext():
        base = item.model_module.build(**kwargs)
    if at.pipeline is not None:  # this rank's stage: the model less the other stages' units
        base = pipelining.split(base, item.spec.model, at.pipeline)
    check_tp_degree(base, item.spec.model, at.tp_degree)
    check_param_groups(at.framework, item.variant.optimizer)
    anatomy = Anatomy.of(base)
    check_frozen(item, anatomy, meta)
    history = item.variant.history
    histories.check(history, at.framework, item.train, anatomy.frozen, at.pipeline is not None)
    base.to(getattr(torch, item.variant.param_dtype))
    if not meta:
        base.to(at.device)
    elif not at.framework.shards_meta_model:
        base.to_empty(device=at.device)
    model = at.framework.parallelize(base, at.mesh)
    if meta and at.framework.shards_meta_model:
        model.to_empty(device=at.device)
    histories.at_start(history, base)
    optimizer, scheduler = optimizers.make(item.variant.optimizer, model, item.train["lr"])
    if loader:
        histories.as_at_save(history, base, optimizer)
    trainee = Trainee(model, base, optimizer, scheduler, anatomy)
    if hasattr(base, "load_balance"):  # router state (models.moe): updated before each step
        optimizer.register_step_pre_hook(lambda *_: base.load_balance(_summed_over_ranks(at)))
    trainee.ignores_frozen = item.variant.ignores_frozen(bool(anatomy.frozen))
    if at.pipeline is not None:
        trainee.pipeline = _pipeline(item, at, model, base)
    if faults.wants_state_at_build(fault):
        model_state, _ = get_state_dict(model, optimizer)
        trainee.at_build = {name: value.clone() for name, value in model_state.items()}
    return trainee


def check_tp_degree(base: torch.nn.Module, model: str, tp_degree: int) -> None:
    """Incompatible (a skip) where the model's own arithmetic needs the TP degree to divide a
    size (``tp_dims``: attention heads, each TP rank computing whole heads; a head split over
    ranks would be another model, not another layout). Every other size a TP plan shards (a
    vocabulary, a hidden size) is torch's to shard unevenly: the cell runs, and torch's own
    error, if any, is its verdict."""
    for dim, size in base.tp_dims().items():
        if size % tp_degree:
            raise Incompatible(
                f"TP degree {tp_degree} does not divide {model} {dim}={size}: the model "
                f"computes whole {dim} on each TP rank (split, it would be another model)"
            )


def check_param_groups(framework: Framework, recipe: str) -> None:
    """Incompatible (a skip) for a recipe that groups parameters by name under a framework that
    keeps a unit's parameters as one flat parameter: it is in one group (the recipe's other
    group would be empty)."""
    if framework.flat_members is not None and recipe in optimizers.GROUPS_BY_NAME:
        raise Incompatible(
            f"optimizer {recipe} groups parameters by name; under {framework.name} each unit's "
            "parameters are one FlatParameter, in one param group"
        )


def check_frozen(item: Item, anatomy: Anatomy, meta: bool = False) -> None:
    """Incompatible (a skip) for frozen_params saved on a model without frozen parameters (its
    state is the one frozen_params ignored saves), and for a loader built on the meta device
    (``meta``) whose checkpoint leaves its frozen parameters out: nothing would give them values
    (a user loads the pretrained base before the adapters)."""
    if item.variant.frozen_params == "saved" and not anatomy.frozen:
        raise Incompatible(
            f"frozen_params saved: {item.spec.model} has no frozen parameters (its state is "
            "frozen_params ignored's)"
        )
    if meta and item.variant.ignores_frozen(bool(anatomy.frozen)):
        raise Incompatible(
            "load_init meta: the checkpoint leaves the frozen parameters out (frozen_params "
            "ignored), so nothing gives the loader's theirs"
        )


def base_seed(item: Item) -> int | None:
    """The seed of the loader's base where it is the saver's: a LoRA model whose checkpoint
    holds no base (frozen_params ignored, the adapter-only checkpoint) is resumed on the base
    the saver built from the same seed, as users resume adapters on the pretrained model; None
    otherwise (the loader builds everything from its own seed)."""
    if models.HF_KEY not in item.spec.model_kwargs or item.variant.frozen_params != "ignored":
        return None
    return item.train["seed"] if item.spec.model_kwargs[models.HF_KEY].get("lora") else None


def train(item: Item, at: Placement, t: Trainee, first_step: int, steps: int) -> list[float]:
    """Train ``steps`` steps on the global batches from ``first_step``; the global mean loss of
    each step. Each data-parallel rank takes its slice of the same global batch (every tensor of
    a dict batch too)."""
    settings = item.train
    dtype = getattr(torch, item.variant.param_dtype)
    losses = []
    for step in range(first_step, first_step + steps):
        if step == histories.midway_step(settings):  # plain: no change
            histories.at_midway(item.variant.history, t.base, t.optimizer)
        inputs, targets = t.base.make_batch(step, settings["global_batch"], settings["seed"])
        x = batch_to(split_batch(inputs, at.dp_size, at.dp_rank), at.device, dtype)
        y = batch_to(split_batch(targets, at.dp_size, at.dp_rank), at.device, torch.float32)
        if t.pipeline is not None:
            count = _global_terms(pipelining.loss_terms(y), at)
            loss_sum = t.pipeline.forward_backward(x, y, at.dp_size / count).to(at.device)
        else:
            loss_sum, count = _forward_backward(at, t, x, y)
        # A stage's optimizer may fail where the others' step (a param group loaded without
        # its hyperparameters): every stage raises, instead of waiting in the next schedule.
        with pipelining.stages_agree(t.pipeline is not None):
            t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
        if t.scheduler is not None:
            t.scheduler.step()
        total = loss_sum.detach().reshape(1).float().clone()
        dist.all_reduce(total)
        losses.append(float(total) / (at.tp_degree * count))
    return losses


def _forward_backward(at: Placement, t: Trainee, x, y) -> tuple[torch.Tensor, int]:
    """One step's forward and backward; (this rank's summed loss, the global batch's terms)."""
    outputs = t.model(x)
    # The loss in float32 whatever the parameters' dtype.
    if isinstance(outputs, torch.Tensor):
        outputs = outputs.float()
    loss_sum, terms = t.base.loss_sum(outputs, y)
    count = _global_terms(terms, at)
    # Gradients are averaged over data-parallel ranks: scale so the result is the gradient
    # of the global mean over every loss term, whatever the slices' sizes. A model's own
    # loss is a mean over its local terms; loss_sum gives it times their number.
    (loss_sum * (at.dp_size / count)).backward()
    return loss_sum, count


def _global_terms(local: int, at: Placement) -> int:
    """The loss terms of the global batch: every rank's (TP ranks of one data-parallel rank,
    and the stages of one pipeline, count the same terms)."""
    total = torch.tensor([local], dtype=torch.int64, device=at.device)
    dist.all_reduce(total)
    return int(total) // (at.tp_degree * at.pp_degree)


def _summed_over_ranks(at: Placement):
    """A function that sums a CPU tensor over the data-parallel ranks: one all_reduce over
    every rank (a pipeline stage's rows for the layers it does not hold are zero), divided by the
    TP degree (the ranks of one TP group count the same tokens)."""

    def summed(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(at.device)
        dist.all_reduce(tensor)
        return tensor.cpu() / at.tp_degree

    return summed


def _pipeline(item: Item, at: Placement, model, base) -> pipelining.Pipeline:
    """The stage's schedule; Incompatible (a skip) when a data-parallel rank's slice of the
    global batch has fewer samples than the layout's microbatches."""
    rows = item.train["global_batch"] // at.dp_size
    if rows < at.pipeline.microbatches:
        raise Incompatible(
            f"{at.pipeline.microbatches} microbatches need {at.pipeline.microbatches} samples "
            f"per data-parallel rank; global_batch {item.train['global_batch']} gives {rows}"
        )
    return pipelining.Pipeline(model, base, at.pipeline, at.device)


def loss_source(t: Trainee) -> str:
    """Where the trainee's loss came from: ``model`` (a built-in's own ``loss_sum``, or the
    model's returned loss), ``user`` or ``fallback`` (pipeline_lib.models._user)."""
    return getattr(t.base, "loss_source", None) or "model"


def state_dict(item: Item, t: Trainee, full: bool = False, fault=None, side="save") -> dict:
    """The state a checkpoint holds: model, optimizer and (Stateful) LR scheduler, as
    get_state_dict gives it in the mode of ``side`` (save or load; a state fault corrupts it, on
    both sides)."""
    opts = checkpoint_io.options(item.variant, bool(t.frozen), full, side)
    if item.variant.legacy(side):  # FSDP1's own API (mode / load_mode legacy)
        model_state, optim_state = legacy_fsdp.state_dict(t.model, t.optimizer)
    else:
        model_state, optim_state = get_state_dict(t.model, t.optimizer, options=opts)
    faults.corrupt_state(fault, model_state, optim_state, t.at_build)
    faults.drop_last_stage(fault, model_state, t.pipeline, side)
    faults.keep_local_experts(fault, model_state, side)
    state = {"model": model_state, "optim": optim_state}
    if t.scheduler is not None:
        state["scheduler"] = t.scheduler
    return state


def live(
    item: Item, at: Placement, t: Trainee, dropped: list[str] = (), side: str = "save"
) -> dict:
    """This rank's live state (pipeline_lib.verify.live: read from the model and optimizer, not
    through the state-dict API), named and filtered as the variant's checkpoint holds it in the mode
    of ``side`` (save or load); ``dropped``: entries the saver leaves out on purpose."""
    framework = at.framework
    starts = framework.flat_starts(t.model) if framework.flat_starts else {}
    members = framework.flat_members(t.model) if framework.flat_members else {}
    flat = live_state(
        t.model,
        t.optimizer,
        t.scheduler,
        t.anatomy,
        starts,
        ignore_frozen=t.ignores_frozen,
        flattened_optim=item.variant.flattened(side),
        flat_members=members,
    )
    flat = checkpoint_io.entries_in_format(item.variant, flat)
    return {n: v for n, v in flat.items() if not any(_within(n, d) for d in dropped)}


def loaded_state(item: Item, at: Placement, t: Trainee, fault=None) -> tuple[dict, dict]:
    """What check 2 compares of a loader (pipeline_lib.verify.checks.loader_vs_saver): its
    state as get_state_dict gives it in the loader's mode (flat, in the variant's format), then
    its live state, read after."""
    state = state_dict(item, t, fault=fault, side="load")
    parts = checkpoint_io.stateful_as_dicts(checkpoint_io.part_in_format(item.variant, state))
    return flatten_with_empty(parts), live(item, at, t, side="load")


def dropped_entries(item: Item, t: Trainee) -> list[str]:
    """The entry a strict / non_strict saver leaves out on purpose (none for other modes)."""
    if not item.variant.drops_entry:
        return []
    return [f"model.{t.anatomy.first_entry(t.ignores_frozen)}"]


def added_entries(item: Item) -> dict:
    """The entry a strict_unexpected / non_strict_unexpected saver adds on purpose (a model
    entry no model has; a fixed value, replicated on every rank), by its model state key."""
    if not item.variant.adds_entry:
        return {}
    key = UNEXPECTED_ENTRY.removeprefix("model.")
    return {key: torch.arange(5, dtype=getattr(torch, item.variant.param_dtype))}


def _within(entry: str, key: str) -> bool:
    """An entry is the state dict key ``key`` or one of its flattened parts."""
    return entry == key or entry.startswith(key + ".")
