"""The live state: what a job's model and optimizer hold, read from the objects themselves and
named the way DCP names checkpoint entries, without torch's state-dict API.

``get_state_dict`` / ``set_state_dict`` (and FSDP's state-dict hooks under them) are what a cell
tests; the saver's reference and the loader's second check are taken from here instead:
parameters and persistent buffers from ``named_parameters`` / ``named_buffers`` of the wrapped
model, extra state from the modules' own ``get_extra_state``, the optimizer's state from
``optimizer.state[param]`` by parameter identity and its ``param_groups`` as they are, the LR
scheduler from its own ``state_dict()``. Wrapper names are removed the way the wrappers add them
(DDP's leading ``module.``, FSDP1's ``_fsdp_wrapped_module.``, activation checkpointing's
``_checkpoint_wrapped_module.``, ``torch.compile``'s ``_orig_mod.``). A flat parameter over
several original ones (FSDP1 ``use_orig_params=False``: ``Framework.flat_members``) and the
optimizer state flat over it become one entry per original parameter. Which entries a model's
state holds (persistent buffers, extra state, tied names) comes from the unwrapped module's own
``nn.Module.state_dict()`` keys, taken once at build (``Anatomy``). A key need not be its
parameter's name (a module's state-dict hooks may rename it, as PEFT's do): which parameter or
buffer a key holds is found by identity, the object ``state_dict(keep_vars=True)`` gives for
it, never from the key's spelling or the hook's own mapping. Imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline_lib.frameworks import FlatMember
from pipeline_lib.verify.entries import EMPTY_STATE, EMPTY_STATE_VALUE, FlatPiece, flatten

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
    # state-dict key -> the parameter or buffer name it holds, where the two differ (a key
    # renamed by a module's state-dict hook); found by the value's identity.
    held: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, module: nn.Module) -> Anatomy:
        params = dict(module.named_parameters(remove_duplicate=False))
        first = {id(p): n for n, p in reversed(list(params.items()))}
        state = module.state_dict(keep_vars=True)
        return cls(
            entries=tuple(state),
            shapes={n: p.shape for n, p in params.items()},
            first_name={n: first[id(p)] for n, p in params.items()},
            frozen=frozenset(n for n, p in params.items() if not p.requires_grad),
            held=held_names(module, state),
        )

    def name_of(self, key: str) -> str:
        """The parameter or buffer name a model state key holds (the key itself unless a hook
        renamed it)."""
        return self.held.get(key, key)

    @property
    def param_keys(self) -> set[str]:
        """The model state keys that hold a parameter."""
        return {key for key in self.entries if self.name_of(key) in self.shapes}

    def first_entry(self, ignore_frozen: bool) -> str:
        """The first model state key in name order (the entry a strict / non_strict saver
        leaves out on purpose: the same on every rank and layout)."""
        frozen = self.frozen if ignore_frozen else frozenset()
        return min(n for n in self.entries if self.name_of(n) not in frozen)

    def canonical(self, entry: str) -> str:
        """An entry's name with every tied parameter under its first name: two entries of one
        canonical name may share storage (a tie), any others may not."""
        if entry.startswith("model."):
            name = self.name_of(entry[len("model.") :])
            return "model." + self.first_name.get(name, name)
        if entry.startswith("optim.state."):
            param, _, key = entry[len("optim.state.") :].rpartition(".")
            return f"optim.state.{self.first_name.get(param, param)}.{key}"
        return entry


def held_names(module: nn.Module, state: Mapping[str, Any]) -> dict[str, str]:
    """state-dict key -> the name of the parameter or buffer its value is (by identity), for
    the keys that differ from it; a key whose value is neither (extra state) holds itself."""
    objects = {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}
    for name, buffer in module.named_buffers(remove_duplicate=False):
        objects.setdefault(id(buffer), name)
    held = {key: objects.get(id(value), key) for key, value in state.items()}
    return {key: name for key, name in held.items() if name != key}


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
    flat_members: Mapping[int, tuple[FlatMember, ...]] | None = None,
) -> dict[str, Any]:
    """This rank's live state as flat entries (``model.<fqn>``, ``optim.state.<fqn>.<key>``,
    ``optim.param_groups.<i|fqn>.<key>``, ``scheduler.<key>``). ``flat_starts``: id(parameter)
    -> where this rank's part starts in the parameter's elements (None: no part on this rank),
    for parameters kept as flat shards (FSDP1); those and their optimizer state become
    FlatPieces. ``flat_members``: id(flat parameter) -> the original parameters it holds, for
    parameters flat over several original ones (FSDP1 use_orig_params=False): each becomes one
    FlatPiece per original parameter, and so does its optimizer state."""
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    flat = _Flat(flat_starts, flat_members or {})
    entries = model_entries(model, anatomy, flat, ddp, ignore_frozen)
    names = {id(p): own_name(n, ddp) for n, p in model.named_parameters()}
    entries.update(optimizer_entries(optimizer, names, anatomy, flat, flattened_optim))
    if scheduler is not None:
        entries.update(flatten(scheduler.state_dict(), "scheduler."))
    return entries


@dataclass(frozen=True)
class _Flat:
    """Where parameters are flat shards: by id, their starts (one original parameter each) or
    their members (several)."""

    starts: Mapping[int, int | None]
    members: Mapping[int, tuple[FlatMember, ...]]

    def entries(self, name: str, value: Any, param, anatomy: Anatomy) -> dict[str, Any]:
        """A parameter's (or its optimizer state's) value as entries by original parameter
        name (None where this rank holds none of it)."""
        if id(param) in self.members:
            return _members(name, value, param, self.members[id(param)])
        if not isinstance(value, torch.Tensor):
            return {name: value}
        return {name: _tensor(value, param, anatomy.shapes.get(name), self.starts)}


def model_entries(model, anatomy: Anatomy, flat: _Flat, ddp: bool, ignore_frozen: bool) -> dict:
    params: dict[str, Any] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        params.update(flat.entries(own_name(n, ddp), p, p, anatomy))
    buffers = {own_name(n, ddp): b for n, b in model.named_buffers(remove_duplicate=False)}
    # The innermost module of a name wins (a wrapper and what it wraps share one own name).
    modules = {own_name(n, ddp): m for n, m in model.named_modules(remove_duplicate=False)}
    entries: dict[str, Any] = {}
    for key in anatomy.entries:
        name = anatomy.name_of(key)  # the parameter or buffer the key holds
        if key.rpartition(".")[2] == EXTRA_STATE:
            module = modules[key.rpartition(".")[0]]
            entries.update(flatten({key: module.get_extra_state()}, "model."))
        elif name in anatomy.shapes:
            # A flat parameter names a tied parameter once: by its first name.
            piece = params[name] if name in params else params[anatomy.first_name[name]]
            if piece is not None and not (ignore_frozen and name in anatomy.frozen):
                entries[f"model.{key}"] = piece
        else:
            entries[f"model.{key}"] = buffers[name].detach()
    return entries


def optimizer_entries(optimizer, names: dict, anatomy: Anatomy, flat: _Flat, flattened: bool):
    entries: dict[str, Any] = {}
    for index, group in enumerate(optimizer.param_groups):
        fqns: list[str] = []
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            members = _member_names(names[id(param)], param, flat)
            fqns += members
            entries.update(_state_entries(state, names[id(param)], param, anatomy, flat))
            if param in optimizer.state and not state:  # a state that exists and is empty
                entries.update(
                    {f"optim.state.{m}.{EMPTY_STATE}": EMPTY_STATE_VALUE for m in members}
                )
        settings = {k: v for k, v in group.items() if k != "params"}
        if flattened:
            for fqn in fqns:
                entries.update(flatten(settings, f"optim.param_groups.{fqn}."))
        else:
            entries.update(flatten({**settings, "params": fqns}, f"optim.param_groups.{index}."))
    return entries


def _member_names(name: str, param, flat: _Flat) -> list[str]:
    """The original parameters' names a parameter of the optimizer stands for."""
    if id(param) not in flat.members:
        return [name]
    return [_member_name(name, member) for member in flat.members[id(param)]]


def _state_entries(state: Mapping, name: str, param, anatomy: Anatomy, flat: _Flat) -> dict:
    """One parameter's optimizer state as ``optim.state.<fqn>.<key>`` entries, by original
    parameter (those this rank holds none of left out)."""
    per_key = {key: flat.entries(name, value, param, anatomy) for key, value in state.items()}
    entries: dict[str, Any] = {}
    for fqn in _member_names(name, param, flat):
        for key, parts in per_key.items():
            if parts[fqn] is not None:
                entries[f"optim.state.{fqn}.{key}"] = parts[fqn]
    return entries


def _member_name(flat_name: str, member: FlatMember) -> str:
    """An original parameter's name: the flat parameter's module, then its name there."""
    module = flat_name.rpartition(".")[0]
    return own_name(f"{module}.{member.fqn}" if module else member.fqn, ddp=False)


def _members(flat_name: str, value: Any, param, members) -> dict[str, Any]:
    """A flat parameter's (or its optimizer state's) shard as one entry per original parameter:
    a FlatPiece of this rank's run of its elements, None where the shard holds none; a value not
    of the flat parameter's shape (0-dim state: Adam's step; not a tensor) whole, where the
    shard holds some."""
    value = value.detach() if isinstance(value, torch.Tensor) else value
    pieces: dict[str, Any] = {}
    for member in members:
        name = _member_name(flat_name, member)
        if member.offset is None:
            pieces[name] = None
        elif not isinstance(value, torch.Tensor):
            pieces[name] = value
        elif value.shape != param.shape:
            # One tensor (Adam's step) stands for every original parameter's: each entry gets
            # its own copy, as each parameter has a step of its own in every other layout, so
            # the storage check sees the state dict's sharing, not this reader's.
            pieces[name] = value.clone()
        else:
            run = value[member.offset : member.offset + member.numel]
            pieces[name] = FlatPiece(member.start, run, torch.Size(member.shape))
    return pieces


def _tensor(value: torch.Tensor, param, shape, flat_starts) -> Any:
    """A parameter's (or its optimizer state's) value as an entry: a FlatPiece where the
    parameter is a flat shard (None where this rank holds none of it), else the tensor."""
    value = value.detach()
    if id(param) not in flat_starts or value.shape != param.shape:
        return value  # not a flat shard, or 0-dim state (Adam's step): whole
    start = flat_starts[id(param)]
    return None if start is None else FlatPiece(start, value.reshape(-1), shape)
