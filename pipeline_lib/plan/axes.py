"""The checkpointing axes of a cell beyond model and layouts: how state is saved and loaded.

Pure (no torch): the config's axis lists -> variants, a variant's path-safe id, and the reason a
variant cannot run with a layout (the cell becomes ``skip``). The jobs implement each value in
pipeline_lib.job.checkpoint_io (mode, format, async save), pipeline_lib.job.optimizers and
worker.py."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from typing import Any

from pipeline_lib.verify.axis_table import AXIS_TABLE

# Axis -> its values, the default first (pipeline_lib.verify.axis_table: each axis declared once;
# its name is its config key, its Parquet column and its word in a variant id).
AXES: dict[str, tuple[str, ...]] = {axis.name: axis.values for axis in AXIS_TABLE}

# The fields of a Variant: one per axis, its default the axis's first value.
_AxisFields = make_dataclass(
    "_AxisFields",
    [(axis.name, str, field(default=axis.default)) for axis in AXIS_TABLE],
    frozen=True,
)


@dataclass(frozen=True)
class Variant(_AxisFields):
    """One value of every axis (its fields: AXIS_TABLE's names, each defaulting to the axis's
    first value)."""

    @property
    def id(self) -> str:
        """Path-safe and unique: the values that differ from the defaults ('' for none)."""
        return "+".join(
            f"{f.name}-{getattr(self, f.name)}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(DEFAULT, f.name)
        )

    @property
    def label(self) -> str:
        return self.id.replace("+", ", ").replace("-", "=", 1) if self.id else "default"

    def to_dict(self) -> dict:
        return asdict(self)

    def side_mode(self, side: str) -> str:
        """The state-dict mode of one side ("save" or "load")."""
        return self.mode if side == "save" or self.load_mode == "same" else self.load_mode

    def flattened(self, side: str) -> bool:
        """The side's optimizer state dict is flattened (flatten_optimizer_state_dict)."""
        return self.side_mode(side) == "flattened_optim"

    @property
    def forms_differ(self) -> bool:
        """The loader's state is named otherwise than the saver's (flattened optimizer state
        on one side only): check 2 compares it with the saver's reference in its own form."""
        return self.flattened("save") != self.flattened("load")

    @property
    def writes_full_state(self) -> bool:
        """Rank 0 writes the full state dict with torch.save (and no DCP of its own)."""
        return self.mode == "full" or self.format == "torch_save_to_dcp"

    @property
    def reads_full_state(self) -> bool:
        """The loader reads a torch.save file of the full state dict."""
        return self.mode == "full" or self.format == "torch_save"

    @property
    def exports_hf(self) -> bool:
        """The saver also exports the model for Hugging Face (pipeline_lib.job.hf_export)."""
        return self.format == "hf_export"

    @property
    def loads_full(self) -> bool:
        """The loader's mode is full: rank 0 reads the full state dict, set_state_dict
        broadcasts it (broadcast_from_rank0)."""
        return self.side_mode("load") == "full"

    def legacy(self, side: str) -> bool:
        """The side uses FSDP1's own state-dict API (FSDP.state_dict_type), not get_state_dict."""
        return self.side_mode(side) == "legacy"

    def full_dcp(self, side: str) -> tuple[bool, bool]:
        """(the side's state dict is full and written with dcp.save, only rank 0 holds it with
        cpu_offload): modes full_dcp and full_dcp_rank0, on the save side (they load sharded)."""
        mode = self.mode if side == "save" else None
        return mode in ("full_dcp", "full_dcp_rank0"), mode == "full_dcp_rank0"

    @property
    def drops_entry(self) -> bool:
        return self.mode in ("strict", "non_strict")

    @property
    def adds_entry(self) -> bool:
        return self.mode in ("strict_unexpected", "non_strict_unexpected")

    @property
    def strict(self) -> bool:
        """The load is strict (every mode but the non_strict ones)."""
        return not self.mode.startswith("non_strict")

    @property
    def saves_sequence(self) -> bool:
        """The saver saves more than once in one run (pipeline_lib.job.sequence_steps)."""
        return self.save_sequence != "once"

    def ignores_frozen(self, frozen: bool) -> bool:
        """The state saved and loaded leaves out the model's frozen parameters (torch's
        ignore_frozen_params); ``frozen``: the model has some."""
        return frozen and self.frozen_params == "ignored"


DEFAULT = Variant()
# The modes a load_mode pairs (the state-dict modes proper; strict ones change entries).
LOAD_MODES = ("sharded", "full", "flattened_optim", "legacy")


def axis_values(config: dict) -> dict[str, list[str]]:
    """Axis -> the values a validated config gives it (its config key is its name)."""
    return {axis: list(config[axis]) for axis in AXES}


def docs_table() -> str:
    """docs/config.md's table of the axes (``python -m pipeline_lib axes-table``)."""
    lines = [
        "| axis: config key and column | values, the default first | what it says |",
        "|---|---|---|",
    ]
    for axis in AXIS_TABLE:
        values = ", ".join(f"`{value}`" for value in axis.values)
        lines.append(f"| `{axis.name}` | {values} | {axis.doc} |")
    return "\n".join(lines) + "\n"


def renamed_keys(config: Any) -> list[str]:
    """One line per axis given under its old config key (``modes``, ``train.optimizer``): each
    axis's key is now its name (pipeline_lib.verify.axis_table)."""
    errors = []
    for axis in AXIS_TABLE:
        *parents, key = (axis.old_key or "").split(".")
        node = config
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if axis.old_key and isinstance(node, dict) and key in node:
            errors.append(
                f"{axis.old_key}: renamed to {axis.name}, a list (each axis's config key is "
                "its name, as its column in matrix.parquet)"
            )
    return errors


def variants(config: dict) -> list[Variant]:
    """``combine_axes: product``: every combination of the axis values; ``one_at_a_time``: the
    first value of every axis, then each other value of one axis with the others at their
    first value; ``pairwise``: a covering array (pipeline_lib.plan.pairwise) in which every
    two values of any two axes meet in some variant, but for pairs RULES makes impossible."""
    values = axis_values(config)
    if config["combine_axes"] == "product":
        combos = [dict(zip(values, c, strict=True)) for c in itertools.product(*values.values())]
    elif config["combine_axes"] == "pairwise":
        combos = _pairwise(tuple((axis, tuple(vals)) for axis, vals in values.items()))
    else:
        base = {axis: vals[0] for axis, vals in values.items()}
        combos = [base] + [
            {**base, axis: value} for axis, vals in values.items() for value in vals[1:]
        ]
    return list(dict.fromkeys(Variant(**c) for c in combos))


@functools.cache
def _pairwise(values: tuple[tuple[str, tuple[str, ...]], ...]) -> list[dict]:
    """The covering array of these axis values (once per process: a Snakemake run asks for a
    grid's variants many times)."""
    from pipeline_lib.plan.pairwise import covering_rows

    given = dict(values)
    # Axes at their default alone that stay out of the array (Axis.in_covering_at_default).
    fixed = {
        axis.name: axis.default
        for axis in AXIS_TABLE
        if not axis.in_covering_at_default and given[axis.name] == (axis.default,)
    }
    covered = {axis: vals for axis, vals in given.items() if axis not in fixed}
    constraints = [
        (tuple(a for a in rule.reads if a not in fixed), _given(rule, fixed)) for rule in RULES
    ]
    return [{**row, **fixed} for row in covering_rows(covered, constraints)]


def _given(rule: Rule, fixed: dict[str, str]) -> Callable[[dict[str, str]], bool]:
    """``rule.allows`` with the axes left out of a covering array at their fixed values."""
    return lambda values: rule.allows({**values, **fixed})


@dataclass(frozen=True)
class Rule:
    """Axis values that cannot combine: ``reason`` says why (None: they can), reading only the
    axes ``reads`` names (a pairwise grid checks a partial combination with it)."""

    reads: tuple[str, ...]
    reason: Callable[[Variant], str | None]

    def allows(self, values: dict[str, str]) -> bool:
        """Whether ``values`` (the axes it reads, at least) can combine. Any other axis is
        left unset: a rule reading one it does not name raises UndeclaredAxis."""
        given = {axis: values[axis] if axis in self.reads else _Unset(axis) for axis in AXES}
        return self.reason(Variant(**given)) is None


class UndeclaredAxis(AssertionError):
    """A Rule read an axis its ``reads`` does not name."""


class _Unset:
    """The value of an axis a Rule does not read: any comparison or use raises."""

    def __init__(self, axis: str):
        self.axis = axis

    def _read(self, *_args):
        raise UndeclaredAxis(f"a conflict rule reads axis {self.axis}, not in its reads")

    __eq__ = __ne__ = __hash__ = __bool__ = __str__ = _read

    def __getattr__(self, name):
        self._read()


def conflict(variant: Variant) -> str | None:
    """Why these axis values cannot combine (every cell of the variant is ``skip``): the first
    rule of RULES that refuses them."""
    return next((reason for rule in RULES if (reason := rule.reason(variant))), None)


def _load_mode_conflict(variant: Variant) -> str | None:
    if variant.load_mode == "same":
        return None
    if variant.load_mode == variant.mode:
        return f"load_mode {variant.load_mode} is mode {variant.mode} itself (load_mode same)"
    if variant.mode not in LOAD_MODES:
        return f"load_mode pairs modes {', '.join(LOAD_MODES)} only (mode {variant.mode})"
    if variant.format != "dcp":
        return f"load_mode {variant.load_mode} is tested with format dcp only"
    return None


def _format_conflict(variant: Variant) -> str | None:
    if variant.format != "dcp" and variant.mode != "sharded":
        return f"format {variant.format} is tested with mode sharded only (mode {variant.mode})"
    return None


def _load_process_conflict(variant: Variant) -> str | None:
    if variant.load_process == "saver" and variant.load_init != "device":
        init = variant.load_init
        return f"load_process saver reuses the saver's model: load_init {init} does not apply"
    return None


def _scheduler_conflict(variant: Variant) -> str | None:
    if variant.format.startswith("safetensors") and variant.optimizer == "adam_lr_warmup":
        return f"format {variant.format} holds tensors only, not the LR scheduler's state"
    return None


def _sequence_conflict(variant: Variant) -> str | None:
    if not variant.saves_sequence:
        return None
    others = {
        "mode": ("sharded", variant.mode),
        "format": ("dcp", variant.format),
        "load_mode": ("same", variant.load_mode),
        "load_process": ("fresh", variant.load_process),
    }
    for axis, (tested, value) in others.items():
        if value != tested:
            sequence = variant.save_sequence
            return f"save_sequence {sequence} is tested with {axis} {tested} only ({axis} {value})"
    return None


def _async_conflict(variant: Variant) -> str | None:
    if variant.async_save != "sync" and (variant.format != "dcp" or variant.mode == "full"):
        return (
            f"async_save {variant.async_save} writes DCP with the default writer "
            f"(mode {variant.mode}, format {variant.format})"
        )
    return None


def _history_conflict(variant: Variant) -> str | None:
    if variant.history == "group_added_midway" and variant.optimizer == "adam_lr_warmup":
        return (
            "history group_added_midway: optimizer adam_lr_warmup's LR scheduler is built for "
            "the param groups it was given; a group added later has no schedule"
        )
    return None


# What torch_checkpointing writes (its CheckpointManager, pipeline_lib.job.engines): the axes'
# defaults only, but for these, which do not depend on the checkpoint library.
_ENGINE_DEFAULTS = ("mode", "format", "async_save", "load_mode", "load_process", "save_sequence")

# Why the grid has no cell saved by one engine and loaded by the other (axis engine names both
# sides): the evidence, docs/findings.md "torch-checkpointing" and tests/test_engines.py, which
# reads each engine's files with the other.
CROSS_ENGINE = (
    "torch_checkpointing writes metadata.pkl and <item>_<rank>.pt files (torch.save), DCP "
    "reads .metadata and its .distcp files: neither engine reads the other's checkpoint"
)


def _engine_conflict(variant: Variant) -> str | None:
    if variant.engine == "dcp":
        return None
    for axis in _ENGINE_DEFAULTS:
        value, tested = getattr(variant, axis), AXES[axis][0]
        if value != tested:
            return f"engine {variant.engine} is tested with {axis} {tested} only ({axis} {value})"
    return None


# In this order: a variant's skip reason is the first rule's that refuses it.
RULES = (
    Rule(("load_mode", "mode", "format"), _load_mode_conflict),
    Rule(("format", "mode"), _format_conflict),
    Rule(("load_process", "load_init"), _load_process_conflict),
    Rule(("format", "optimizer"), _scheduler_conflict),
    Rule(("save_sequence", "mode", "format", "load_mode", "load_process"), _sequence_conflict),
    Rule(("async_save", "format", "mode"), _async_conflict),
    Rule(("history", "optimizer"), _history_conflict),
    Rule(("engine", *_ENGINE_DEFAULTS), _engine_conflict),
)


def layout_conflict(
    variant: Variant, side: str, world_size: int, framework: str | None = None
) -> str | None:
    """Why a variant cannot run on one side (save or load) of a layout of this world size and
    framework (None: not known, no rule on it)."""
    if side == "load" and variant.format == "torch_save" and world_size != 1:
        return "format torch_save is loaded in a single-process layout only (world size 1)"
    if variant.legacy(side) and framework is not None and not framework.startswith("fsdp1"):
        return (
            f"{'load_mode' if side == 'load' and variant.load_mode != 'same' else 'mode'} "
            "legacy: FSDP.state_dict_type is "
            f"FSDP1's own API (framework {framework})"
        )
    return None
