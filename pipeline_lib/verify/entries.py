"""State entries: a state dict flattened into the entries DCP names (``model.<fqn>``,
``optim.state.<fqn>.<key>``, ``optim.param_groups.<i>.<key>``), and what kind each is. Imports
torch."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from pipeline_lib.verify.results import EntryInfo


def flatten(state: Mapping, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts (and lists holding dicts, lists or tensors) into 'a.b.0.c' keys,
    matching the entry names DCP writes to .metadata."""
    return {name: holder[key] for name, (holder, key) in leaves(state, prefix).items()}


# The key that names a parameter's optimizer state that exists and is empty ({}):
# ``optim.state.<fqn>.{}``. ``flatten`` leaves an empty dict out (it has no leaves), so a state
# {} would look like no state at all; an optimizer that gains (or loses) such entries in a load
# holds other state keys than the saver's (torch's Optimizer.state_dict lists them).
EMPTY_STATE = "{}"
EMPTY_STATE_VALUE = "empty"


def empty_states(optim_state: Any) -> dict[str, str]:
    """``optim.state.<fqn>.{}`` for each parameter whose entry in an optimizer state dict's
    ``state`` (by fqn) is an empty dict ({} for a flattened optimizer state dict: its empty
    entries are gone in torch's own flattening)."""
    state = optim_state.get("state") if isinstance(optim_state, Mapping) else None
    if not isinstance(state, Mapping):
        return {}
    return {
        f"optim.state.{fqn}.{EMPTY_STATE}": EMPTY_STATE_VALUE
        for fqn, value in state.items()
        if isinstance(value, Mapping) and not value
    }


def flatten_with_empty(parts: Mapping) -> dict[str, Any]:
    """``flatten`` of a checkpoint's parts (model, optim, ...), with the optimizer state's empty
    entries named (``empty_states``)."""
    return {**flatten(parts), **empty_states(parts.get("optim"))}


def leaves(state: Mapping | list, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Every entry of ``flatten(state)`` -> (the dict or list holding it, its key there): where
    to put a new value of the entry."""
    found: dict[str, tuple[Any, Any]] = {}
    items = state.items() if isinstance(state, Mapping) else enumerate(state)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) or (isinstance(value, list) and _holds_structure(value)):
            found.update(leaves(value, name + "."))
        else:
            found[name] = (state, key)
    return found


def _holds_structure(values: list) -> bool:
    return any(isinstance(v, (Mapping, list, torch.Tensor)) for v in values)


# Where an optimizer's param group settings are named (``optim.param_groups.<i|fqn>.<key>``).
PARAM_GROUPS = "optim.param_groups."
# The model entry a strict_unexpected / non_strict_unexpected saver adds (no model has it).
UNEXPECTED_ENTRY = "model.dcp_matrix_unexpected"


def entry_kind(entry: str, param_names: set[str]) -> str:
    """param, buffer, optim.<state key> (exp_avg, step, ...) or optim.param_groups."""
    if entry.startswith("model."):
        return "param" if entry[len("model.") :] in param_names else "buffer"
    if entry.startswith("optim.state."):
        return "optim." + entry.rsplit(".", 1)[1]
    if entry.startswith(PARAM_GROUPS):
        return "optim.param_groups"
    return "other"


def describe(value: Any) -> tuple[str, list[int] | None]:
    """(dtype, shape) of an entry; non-tensor entries have the Python type and no shape."""
    if isinstance(value, torch.Tensor):
        return str(value.dtype).removeprefix("torch."), list(value.shape)
    return type(value).__name__, None


def entry_table(flat: dict, param_names: set[str]) -> dict[str, EntryInfo]:
    """Kind, dtype and shape of every entry of a saved state (tensors.parquet)."""
    return {n: EntryInfo(entry_kind(n, param_names), *describe(v)) for n, v in flat.items()}


@dataclass(frozen=True)
class FlatPiece:
    """This rank's part of a tensor entry held as a run of the entry's elements in row-major
    order (FSDP1's flat shards): elements ``start`` .. ``start + data.numel()`` of a tensor of
    ``shape`` (pipeline_lib.verify.live)."""

    start: int
    data: torch.Tensor  # 1-D
    shape: torch.Size  # the whole entry's

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype
