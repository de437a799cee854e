"""The checkpointing axes of a cell beyond model and layouts: how state is saved and loaded.

Pure (no torch): the config's axis lists -> variants, a variant's path-safe id, and the reason a
variant cannot run with a layout (the cell becomes ``skip``). The jobs implement each value in
pipeline_lib.job.checkpoint_io (mode, format, async save), pipeline_lib.job.optimizers and
worker.py."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, fields

# Axis -> its values, the default first. Config keys: modes, formats, async_save, dtypes,
# load_init (lists) and train.optimizer (a name or a list).
AXES: dict[str, tuple[str, ...]] = {
    # sharded: DCP of get_state_dict; full: full state dict written by rank 0 with torch.save and
    # loaded with broadcast_from_rank0; flattened_optim: flatten_optimizer_state_dict=True;
    # strict / non_strict: the saver leaves one model entry out on purpose, a strict load must
    # fail naming it, a non-strict one must report exactly it as missing;
    # strict_unexpected / non_strict_unexpected: the saver adds one model entry the model lacks
    # (UNEXPECTED_ENTRY), a strict load must fail naming it, a non-strict one must report
    # exactly it as unexpected.
    "mode": (
        "sharded",
        "full",
        "flattened_optim",
        "strict",
        "non_strict",
        "strict_unexpected",
        "non_strict_unexpected",
    ),
    # The loader's state-dict mode: same (the mode's own, both sides alike), or one of
    # LOAD_MODES other than the mode: the saver writes what its mode writes, the loader loads
    # it in this mode (docs/config.md, "Save mode != load mode").
    "load_mode": ("same", "sharded", "full", "flattened_optim"),
    # dcp: FileSystemWriter; safetensors(_consolidated): HuggingFaceStorageWriter (sharded
    # files, and also one consolidated file); torch_save: DCP converted with dcp_to_torch_save
    # and loaded in a single-process layout; torch_save_to_dcp: a torch.save full state dict
    # converted with torch_save_to_dcp and loaded under any layout; hf_export: dcp, plus the
    # model state exported for Hugging Face and loaded back with from_pretrained on the save
    # side (pipeline_lib.job.hf_export; hf_models only).
    "format": (
        "dcp",
        "safetensors",
        "safetensors_consolidated",
        "torch_save",
        "torch_save_to_dcp",
        "hf_export",
    ),
    # sync: dcp.save; thread / process: dcp.async_save with that checkpointer type;
    # process_pinned: the process checkpointer staging into pinned (and shared) memory with
    # DCP's DefaultStager (CUDA only: a skip on a CPU-only job).
    "async_save": ("sync", "thread", "process", "process_pinned"),
    # pipeline_lib.job.optimizers
    "optimizer": ("adam", "adamw", "sgd", "adamw_param_groups", "adam_lr_warmup"),
    "param_dtype": ("float32", "bfloat16"),
    # device: the loading model is built with its values; meta: built on the meta device and
    # materialized empty (to_empty), so only the load can give it values.
    "load_init": ("device", "meta"),
    # fresh: the load job's own process builds the loader; saver: the saver's process loads the
    # checkpoint right after its save into its own model and optimizer (trained on since), as a
    # trainer resumes after an evaluation; the cell (save layout = load layout) reads its result.
    "load_process": ("fresh", "saver"),
    # once: one save; load_last / load_first: the saver saves twice with one checkpointer object, at
    # steps train.steps and train.steps + train.resume_steps, into separate folders; the cells load
    # the last checkpoint of the sequence or the first (pipeline_lib.job.sequence_steps).
    "save_sequence": ("once", "load_last", "load_first"),
    # A model's frozen parameters (requires_grad False: a LoRA model's base): ignored, left
    # out of the state saved and loaded (torch's ignore_frozen_params; for a LoRA model, the
    # adapter-only checkpoint), or saved with the rest (the full state). A model without frozen
    # parameters has one state: its cells of frozen_params saved are skip.
    "frozen_params": ("ignored", "saved"),
}
CONFIG_KEYS = {
    "mode": "modes",
    "load_mode": "load_modes",
    "format": "formats",
    "async_save": "async_save",
    "optimizer": "train.optimizer",
    "param_dtype": "dtypes",
    "load_init": "load_init",
    "load_process": "load_process",
    "save_sequence": "save_sequences",
    "frozen_params": "frozen_params",
}


@dataclass(frozen=True)
class Variant:
    mode: str = "sharded"
    load_mode: str = "same"
    format: str = "dcp"
    async_save: str = "sync"
    optimizer: str = "adam"
    param_dtype: str = "float32"
    load_init: str = "device"
    load_process: str = "fresh"
    save_sequence: str = "once"
    frozen_params: str = "ignored"

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

    @property
    def load_must_fail(self) -> bool:
        """A strict load of a checkpoint the saver changed on purpose must fail naming it."""
        return self.mode in ("strict", "strict_unexpected")


DEFAULT = Variant()
# The modes a load_mode pairs (the state-dict modes proper; strict ones change entries).
LOAD_MODES = ("sharded", "full", "flattened_optim")


def axis_values(config: dict) -> dict[str, list[str]]:
    values = {axis: config[key] for axis, key in CONFIG_KEYS.items() if axis != "optimizer"}
    optimizer = config["train"]["optimizer"]
    values["optimizer"] = [optimizer] if isinstance(optimizer, str) else optimizer
    return values


def variants(config: dict) -> list[Variant]:
    """``combine_axes: product``: every combination of the axis values; ``one_at_a_time``: the
    first value of every axis, then each other value of one axis with the others at their
    first value."""
    values = axis_values(config)
    if config["combine_axes"] == "product":
        combos = [dict(zip(values, c, strict=True)) for c in itertools.product(*values.values())]
    else:
        base = {axis: vals[0] for axis, vals in values.items()}
        combos = [base] + [
            {**base, axis: value} for axis, vals in values.items() for value in vals[1:]
        ]
    return list(dict.fromkeys(Variant(**c) for c in combos))


def conflict(variant: Variant) -> str | None:
    """Why these axis values cannot combine (every cell of the variant is ``skip``)."""
    if variant.load_mode != "same" and (reason := _load_mode_conflict(variant)):
        return reason
    if variant.format != "dcp" and variant.mode != "sharded":
        return f"format {variant.format} is tested with mode sharded only (mode {variant.mode})"
    if variant.load_process == "saver" and variant.load_init != "device":
        init = variant.load_init
        return f"load_process saver reuses the saver's model: load_init {init} does not apply"
    if variant.format.startswith("safetensors") and variant.optimizer == "adam_lr_warmup":
        return f"format {variant.format} holds tensors only, not the LR scheduler's state"
    if variant.saves_sequence and (reason := _sequence_conflict(variant)):
        return reason
    if variant.async_save != "sync" and (variant.format != "dcp" or variant.mode == "full"):
        return (
            f"async_save {variant.async_save} writes DCP with the default writer "
            f"(mode {variant.mode}, format {variant.format})"
        )
    return None


def _load_mode_conflict(variant: Variant) -> str | None:
    if variant.load_mode == variant.mode:
        return f"load_mode {variant.load_mode} is mode {variant.mode} itself (load_mode same)"
    if variant.mode not in LOAD_MODES:
        return f"load_mode pairs modes {', '.join(LOAD_MODES)} only (mode {variant.mode})"
    if variant.format != "dcp":
        return f"load_mode {variant.load_mode} is tested with format dcp only"
    return None


def _sequence_conflict(variant: Variant) -> str | None:
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


def layout_conflict(variant: Variant, side: str, world_size: int) -> str | None:
    """Why a variant cannot run on one side (save or load) of a layout of this world size."""
    if side == "load" and variant.format == "torch_save" and world_size != 1:
        return "format torch_save is loaded in a single-process layout only (world size 1)"
    return None
