"""The live state: what a job's model and optimizer hold, read from the objects themselves and
named the way DCP names checkpoint entries, without torch's state-dict API.

``get_state_dict`` / ``set_state_dict`` (and FSDP's state-dict hooks under them) are what a cell
tests; the saver's reference and the loader's second check are taken from here instead:
parameters and persistent buffers from ``named_parameters`` / ``named_buffers`` of the wrapped
model, extra state from the modules' own ``get_extra_state``, the optimizer's state from
``optimizer.state[param]`` by parameter identity and its ``param_groups`` as they are, the LR
scheduler from its own ``state_dict()``. Wrapper names are removed the way the wrappers add them
(DDP's leading ``module.``, FSDP1's ``_fsdp_wrapped_module.``, activation checkpointing's
``_checkpoint_wrapped_module.``, ``torch.compile``'s ``_orig_mod.``). Which entries a model's
state holds (persistent buffers, extra state, tied names) comes from the unwrapped module's own
``nn.Module.state_dict()`` keys, taken once at build (``Anatomy``). Imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline_lib.entries import FlatPiece, flatten

# Module names a wrapper inserts between a model's own names.
WRAPPER_NAMES = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})
EXTRA_STATE = "_extra_state"


@dataclass(frozen=True)
class Anatomy:
    """What a model's state holds, from the unwrapped module at build (no values)."""

    entries: tuple[str, ...]  # nn.Module.state_dict() keys: parameters, buffers, extra state
    shapes: dict[str, torch.Size]  # parameter name -> shape (every name of a tied parameter)
    first_name: dict[str, str]  # parameter name -> the first name of that parameter (ties)
    frozen: frozenset[str]

    @classmethod
    def of(cls, module: nn.Module) -> Anatomy:
        params = dict(module.named_parameters(remove_duplicate=False))
        first = {id(p): n for n, p in reversed(list(params.items()))}
        return cls(
            entries=tuple(module.state_dict(keep_vars=True)),
            shapes={n: p.shape for n, p in params.items()},
            first_name={n: first[id(p)] for n, p in params.items()},
            frozen=frozenset(n for n, p in params.items() if not p.requires_grad),
        )

    def first_entry(self, ignore_frozen: bool) -> str:
        """The first model state key in name order (the entry a strict / non_strict saver
        leaves out on purpose: the same on every rank and layout)."""
        return min(n for n in self.entries if not (ignore_frozen and n in self.frozen))

    def canonical(self, entry: str) -> str:
        """An entry's name with every tied parameter under its first name: two entries of one
        canonical name may share storage (a tie), any others may not."""
        if entry.startswith("model."):
            name = entry[len("model.") :]
            return "model." + self.first_name.get(name, name)
        if entry.startswith("optim.state."):
            param, _, key = entry[len("optim.state.") :].rpartition(".")
            return f"optim.state.{self.first_name.get(param, param)}.{key}"
        return entry


def own_name(name: str, ddp: bool) -> str:
    """A wrapped model's parameter, buffer or module name as the unwrapped model names it."""
    parts = name.split(".") if name else []
    if ddp and parts[:1] == ["module"]:
        parts = parts[1:]
    return ".".join(p for p in parts if p not in WRAPPER_NAMES)


def live_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    anatomy: Anatomy,
    flat_starts: Mapping[int, int | None],
    ignore_frozen: bool,
    flattened_optim: bool,
) -> dict[str, Any]:
    """This rank's live state as flat entries (``model.<fqn>``, ``optim.state.<fqn>.<key>``,
    ``optim.param_groups.<i|fqn>.<key>``, ``scheduler.<key>``). ``flat_starts``: id(parameter)
    -> where this rank's part starts in the parameter's elements (None: no part on this rank),
    for parameters kept as flat shards (FSDP1); those and their optimizer state become
    FlatPieces."""
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    entries = model_entries(model, anatomy, flat_starts, ddp, ignore_frozen)
    names = {id(p): own_name(n, ddp) for n, p in model.named_parameters()}
    entries.update(optimizer_entries(optimizer, names, anatomy, flat_starts, flattened_optim))
    if scheduler is not None:
        entries.update(flatten(scheduler.state_dict(), "scheduler."))
    return entries


def model_entries(model, anatomy: Anatomy, flat_starts, ddp: bool, ignore_frozen: bool) -> dict:
    params = {own_name(n, ddp): p for n, p in model.named_parameters(remove_duplicate=False)}
    buffers = {own_name(n, ddp): b for n, b in model.named_buffers(remove_duplicate=False)}
    # The innermost module of a name wins (a wrapper and what it wraps share one own name).
    modules = {own_name(n, ddp): m for n, m in model.named_modules(remove_duplicate=False)}
    entries: dict[str, Any] = {}
    for name in anatomy.entries:
        if name.rpartition(".")[2] == EXTRA_STATE:
            module = modules[name.rpartition(".")[0]]
            entries.update(flatten({name: module.get_extra_state()}, "model."))
        elif name in anatomy.shapes:
            if not (ignore_frozen and name in anatomy.frozen):
                piece = _tensor(params[name], params[name], anatomy.shapes[name], flat_starts)
                if piece is not None:
                    entries[f"model.{name}"] = piece
        else:
            entries[f"model.{name}"] = buffers[name].detach()
    return entries


def optimizer_entries(optimizer, names: dict, anatomy: Anatomy, flat_starts, flattened: bool):
    entries: dict[str, Any] = {}
    for index, group in enumerate(optimizer.param_groups):
        fqns = [names[id(p)] for p in group["params"]]
        for param, fqn in zip(group["params"], fqns, strict=True):
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor):
                    value = _tensor(value, param, anatomy.shapes[fqn], flat_starts)
                if value is not None:
                    entries[f"optim.state.{fqn}.{key}"] = value
        settings = {k: v for k, v in group.items() if k != "params"}
        if flattened:
            for fqn in fqns:
                entries.update(flatten(settings, f"optim.param_groups.{fqn}."))
        else:
            entries.update(flatten({**settings, "params": fqns}, f"optim.param_groups.{index}."))
    return entries


def _tensor(value: torch.Tensor, param, shape, flat_starts) -> Any:
    """A parameter's (or its optimizer state's) value as an entry: a FlatPiece where the
    parameter is a flat shard (None where this rank holds none of it), else the tensor."""
    value = value.detach()
    if id(param) not in flat_starts or value.shape != param.shape:
        return value  # not a flat shard, or 0-dim state (Adam's step): whole
    start = flat_starts[id(param)]
    return None if start is None else FlatPiece(start, value.reshape(-1), shape)
