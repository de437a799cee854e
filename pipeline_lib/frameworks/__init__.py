"""Parallel frameworks, one module each, registered by module name.

Each module defines ``FRAMEWORK = Framework(...)``. Module import must not import torch (the grid
and config validation use this metadata without torch); ``parallelize`` imports what it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, NamedTuple

from pipeline_lib.common.registry import load_module, module_names

# Pipeline schedules a pipeline-parallel layout may name (torch.distributed.pipelining's
# ScheduleGPipe and Schedule1F1B), and the layout's defaults (docs/config.md).
PP_SCHEDULES = ("1f1b", "gpipe")
DEFAULT_PP_SCHEDULE = "1f1b"
DEFAULT_MICROBATCHES = 4


class FlatMember(NamedTuple):
    """One original parameter of a flat parameter (FSDP1's ``FlatParameter`` with
    ``use_orig_params=False``) as this rank's shard of the flat parameter holds it."""

    fqn: str  # its name in the module that holds the flat parameter
    shape: tuple[int, ...]
    offset: int | None  # where its run of elements starts in this rank's shard (None: none here)
    numel: int  # how many of its elements this rank's shard holds
    start: int | None  # where that run starts in the parameter's own elements


@dataclass(frozen=True)
class Framework:
    name: str
    # Names of the device-mesh dims, outermost first; the config's mesh has one size per name.
    mesh_dims: tuple[str, ...]
    # parallelize(model, mesh) -> wrapped model; model follows pipeline_lib.models' interface.
    parallelize: Callable[[Any, Any], Any]
    # The mesh dim that tensor parallelism uses (its size must divide the model's tp_dims).
    tp_dim: str | None = None
    # Largest world size the framework supports (single process: 1).
    max_world_size: int | None = None
    # A model built on the meta device is parallelized as is and materialized afterwards
    # (to_empty allocates only this rank's shards); otherwise it is materialized first (TP's
    # distribute_tensor copies a meta tensor to the mesh device and fails, torch 2.13 CPU).
    shards_meta_model: bool = False
    # flat_starts(wrapped model) -> {id(parameter): where this rank's part starts in the
    # parameter's elements, None where it holds none}, for frameworks that keep parameters as
    # flat shards (FSDP1); pipeline_lib.verify.live reads such parameters as FlatPieces.
    flat_starts: Callable[[Any], dict[int, int | None]] | None = None
    # flat_members(wrapped model) -> {id(flat parameter): its original parameters}, for frameworks
    # whose parameters (and optimizer state) are flat over several original ones (FSDP1
    # use_orig_params=False); pipeline_lib.verify.live reads one entry per original parameter.
    flat_members: Callable[[Any], dict[int, tuple[FlatMember, ...]]] | None = None
    # The dtype forward and backward compute in when it is not the parameters' (mixed
    # precision): the resumed losses of its cells are judged with resume_rtol_bfloat16.
    compute_dtype: str | None = None
    # The mesh dim of pipeline parallelism: each rank holds the stage of its place on this dim
    # (pipeline_lib.job.pipelining splits the model before ``parallelize``, which gets the stage).
    pp_dim: str | None = None

    @property
    def data_parallel_dims(self) -> tuple[str, ...]:
        return tuple(d for d in self.mesh_dims if d not in (self.tp_dim, self.pp_dim))


def names() -> list[str]:
    return module_names(__name__)


@cache
def get(name: str) -> Framework:
    return load_module(__name__, name).FRAMEWORK
