"""How many bytes a grid writes, and whether a job's filesystem has room for its items.

An estimate, from each model's state (parameters, buffers, optimizer state at the variant's
dtype) and per-entry overheads measured on torch 2.13 (2026-12-02: a DCP chunk is a torch.save
archive of about 1.6-1.9 KiB beyond its data, a reference piece about 0.3-0.4 KiB, a record and
its worker file about 0.9 KiB per entry and cell). It errs on the high side: every optimizer
keeps two states per parameter (SGD keeps one), frozen parameters are counted as trained.
Torch-free for the built-in models; a model of your own is built on the meta device (on the CPU
when that raises). A model that cannot be built at all: check-config refuses the config,
naming it; a job leaves its items out of the room check (their ranks record why they fail).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline_lib.common.errors import human_bytes

if TYPE_CHECKING:
    from pipeline_lib.plan.axes import Variant
    from pipeline_lib.plan.specs import ItemSpec, JobSpec

# Built-in models: (parameter elements, parameter tensors, buffer elements, buffer tensors) of
# build() (tests/test_hardening.py checks them against the models).
BUILTIN_STATE = {
    "mlp": (2280, 10, 0, 0),
    "mlp_extra_state": (2280, 10, 17, 2),
    "mlp_frozen": (2280, 10, 0, 0),
    "mlp_object_state": (2280, 10, 0, 0),
    "mlp_renamed": (2280, 10, 0, 0),
    "mlp_uneven": (868, 10, 0, 0),
    "moe": (17936, 32, 16, 2),
    "odd_vocab": (12624, 24, 0, 0),
    "tied_embedding": (2744, 5, 30, 2),
    "transformer": (21088, 24, 0, 0),
}
CHUNK_OVERHEAD = 2048  # per entry and rank, in a DCP checkpoint (or safetensors file)
PIECE_OVERHEAD = 512  # per entry and rank, in the saver's reference
SEAL_PER_FILE = 128  # per checkpoint file (a rank's .distcp, .metadata), in sealed mode's seal
FILE_ENTRY_OVERHEAD = 512  # per entry, in a torch.save full state dict
SAVE_RECORD_PER_ENTRY = 1024  # save record + worker result, per entry
LOAD_RECORD_PER_ENTRY = 1024  # load record + worker result, per entry and cell
PER_JOB = 64 * 1024  # specs, progress files, log
# A torch_versions environment: torch (a CPU wheel ~0.9 GB unpacked, a CUDA one several GB;
# docs/torch-versions.md: 2.14.1 is a 2.7 GB download) and the job's packages. Counted when not
# built yet.
ENVIRONMENT = 6 * 2**30
PARAM_GROUP_ENTRIES = 16  # lr, betas, eps, weight_decay, ..., params, per group


@dataclass
class Estimate:
    parts: dict[str, int] = field(default_factory=dict)

    def add(self, part: str, n: float) -> None:
        self.parts[part] = self.parts.get(part, 0) + int(n)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def __str__(self) -> str:
        shown = ", ".join(f"{k} {human_bytes(v)}" for k, v in self.parts.items() if v)
        return f"about {human_bytes(self.total)}" + (f" ({shown})" if shown else "")


class ModelBuildError(ValueError):
    """A model of the grid cannot be built, so its state cannot be counted; the message names
    the model (``model``) and the exception."""

    def __init__(self, model: str, message: str):
        super().__init__(message)
        self.model = model


def model_state(model: str, model_kwargs: dict | None = None) -> tuple[int, int, int, int]:
    """(parameter elements, parameter tensors, buffer elements, buffer tensors) of a model
    (``model_kwargs``: an hf_models entry, pipeline_lib.models.spec_kwargs). Built on the meta
    device, on the CPU when that fails (a build that calls ``.item()``, say); ModelBuildError
    when both raise."""
    if model in BUILTIN_STATE:
        return BUILTIN_STATE[model]
    import torch

    from pipeline_lib import models
    from pipeline_lib.common.errors import one_line

    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                module = models.get(model, model_kwargs).build(**(model_kwargs or {}))
            break
        except Exception as exc:  # the user's code: any exception
            error = exc
    else:
        message = f"model {model!r}: build() raised {one_line(error)}"
        raise ModelBuildError(model, message) from error
    params, buffers = list(module.parameters()), list(module.buffers())
    return (sum(p.numel() for p in params), len(params), sum(b.numel() for b in buffers),
            len(buffers))  # fmt: skip


def _entries_and_bytes(model: str, variant: Variant, kwargs: dict | None = None) -> tuple[int, int]:
    """(state entries, state bytes) of one item's saved state."""
    p_numel, p_count, b_numel, b_count = model_state(model, kwargs)
    element = 2 if variant.param_dtype == "bfloat16" else 4
    states = 1 if variant.optimizer == "sgd" else 2
    entries = p_count * (2 + states) + b_count + 2 * PARAM_GROUP_ENTRIES + 8
    data = element * (p_numel * (1 + states) + b_numel) + 8 * p_count
    return entries, data


def save_item_bytes(
    model: str, variant: Variant, world_size: int, kwargs=None, sealed: bool = False
) -> Estimate:
    """What one save item writes: checkpoint, reference (sealed mode: a seal instead),
    conversions, record."""
    entries, data = _entries_and_bytes(model, variant, kwargs)
    estimate = Estimate()
    full = data + entries * FILE_ENTRY_OVERHEAD
    dcp = data + entries * world_size * CHUNK_OVERHEAD
    mode, fmt = variant.mode, variant.format
    if mode == "full":
        estimate.add("checkpoints", full)
    else:
        estimate.add("checkpoints", dcp)
    if fmt == "safetensors_consolidated":
        estimate.add("conversions", data + entries * CHUNK_OVERHEAD)
    elif fmt in ("torch_save", "torch_save_to_dcp") and mode != "full":
        estimate.add("conversions", full)
    if sealed:
        estimate.add("seals", (world_size + 1) * SEAL_PER_FILE)
    else:
        estimate.add("references", data + entries * world_size * PIECE_OVERHEAD)
    estimate.add("records", entries * SAVE_RECORD_PER_ENTRY)
    return estimate


def load_cell_bytes(model: str, variant: Variant, kwargs=None) -> Estimate:
    entries, _ = _entries_and_bytes(model, variant, kwargs)
    estimate = Estimate()
    estimate.add("records", entries * LOAD_RECORD_PER_ENTRY)
    return estimate


def job_bytes(spec: JobSpec, unbuildable_ok: bool = False) -> Estimate:
    """What a save or load job (pipeline_lib.plan.grid.job_spec) writes, its skipped items aside.
    ``unbuildable_ok``: an item whose model cannot be built counts nothing (its ranks fail
    building it and record why) instead of raising ModelBuildError."""
    estimate = Estimate({"records": PER_JOB})
    world = spec.layout.world_size
    for item in spec.items:
        if item.skip:
            continue
        try:
            part = _item_bytes(spec, item, world)
        except ModelBuildError:
            if not unbuildable_ok:
                raise
            continue
        for key, value in part.parts.items():
            estimate.add(key, value)
    return estimate


def _item_bytes(spec: JobSpec, item: ItemSpec, world: int) -> Estimate:
    if spec.kind == "save":
        sealed = item.verify.get("reference") == "sealed"
        return save_item_bytes(item.model, item.variant, world, _hf_kwargs(item), sealed)
    part = load_cell_bytes(item.model, item.variant, _hf_kwargs(item))
    part.parts = {k: v * len(item.sources) for k, v in part.parts.items()}
    return part


def _hf_kwargs(item: ItemSpec) -> dict | None:
    """An item's hf_models or torchtitan_models entry (other model_kwargs resize a built-in:
    BUILTIN_STATE's)."""
    from pipeline_lib.models import HF_KEY, TITAN_KEY

    return item.model_kwargs if item.model_kwargs.keys() & {HF_KEY, TITAN_KEY} else None


def grid_bytes(config: dict) -> Estimate:
    """What the whole grid writes (every job, the torch environments not built yet);
    ModelBuildError when a model of the grid cannot be built."""
    from pipeline_lib.plan import grid

    estimate = Estimate()
    specs = [grid.save_job_spec(config, *job) for job in grid.save_jobs(config)]
    specs += [grid.load_job_spec(config, *job) for job in grid.load_jobs(config)]
    specs += [grid.fault_save_spec(config, c) for c in grid.fault_cells(config)]
    specs += [grid.fault_load_spec(config, c) for c in grid.fault_cells(config)]
    for spec in specs:
        for key, value in job_bytes(spec).parts.items():
            estimate.add(key, value)
    for version in config["torch_versions"]:
        if not Path(grid.env_marker(config, version)).exists():
            estimate.add("environments", ENVIRONMENT)
    return estimate


# A job is refused when its filesystem has less free space than this share of its estimate:
# clearly too little, as the estimate errs high (by up to about 2x, measured on the models here).
REFUSE_BELOW = 0.5


def room_error(spec: JobSpec, folder: str | Path) -> str | None:
    """Why the job ``spec`` should not start: its filesystem (that of ``folder``) has clearly
    less free space than the job's estimate; None when it may have room."""
    need = job_bytes(spec, unbuildable_ok=True)
    free = shutil.disk_usage(folder).free
    if free >= need.total * REFUSE_BELOW:
        return None
    return (
        f"not enough disk space: the {spec.kind} job of {spec.layout.name} needs "
        f"{need}, {human_bytes(free)} free on the filesystem of {folder}; nothing was run"
    )
