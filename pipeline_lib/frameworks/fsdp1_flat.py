"""FSDP1 with ``use_orig_params=False`` (how accelerate-era checkpoints were written):
FULL_SHARD, one unit per model block plus the root, as ``fsdp1``; each unit's parameters are
one ``FlatParameter`` and the optimizer holds those, so its state is flat over this rank's shard
of each.

The live state (pipeline_lib.verify.live) cannot read such parameters by name: the model's
``named_parameters`` are the flat parameters (``<unit>._flat_param``). Which original
parameters a flat parameter holds, their shapes and where this rank's shard holds a run of each
are kept only in FSDP1's private ``FlatParameter`` fields ``_fqns``, ``_shapes``, ``_numels``
and ``_shard_param_infos`` (``fsdp1`` reads ``_shard_param_infos`` for the same reason):
``flat_members`` reads them, nothing else does.
"""

import math

from pipeline_lib.frameworks import FlatMember, Framework
from pipeline_lib.frameworks.fsdp1 import wrap

# What torch 2.13 raises when one unit's parameters mix requires_grad: auto-wrapping checks
# each unit (_wrap_utils._validate_frozen_params), flattening checks the rest (FlatParamHandle).
MIXED_REQUIRES_GRAD = (
    "FSDP does not support wrapping such modules when use_orig_params=False",
    "Must flatten tensors with uniform `requires_grad`",
)


def parallelize(model, mesh):
    from pipeline_lib.common.errors import Incompatible, one_line

    try:
        return wrap(model, mesh, "FULL_SHARD", use_orig_params=False)
    except ValueError as exc:
        if not any(message in str(exc) for message in MIXED_REQUIRES_GRAD):
            raise
        # torch refuses by design: one FlatParameter has one requires_grad.
        raise Incompatible(f"FSDP1 use_orig_params=False: {one_line(exc)}") from exc


def flat_members(model) -> dict[int, tuple[FlatMember, ...]]:
    """id(FlatParameter) -> the original parameters it holds, in its order, each with where
    this rank's shard holds a run of its elements (private FSDP1 fields: module docstring)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    members: dict[int, tuple[FlatMember, ...]] = {}
    for unit in FullyShardedDataParallel.fsdp_modules(model):
        if unit._handle is not None:  # None: a unit that holds no parameters of its own
            flat = unit._handle.flat_param
            members[id(flat)] = _members(flat)
    return members


def _members(flat) -> tuple[FlatMember, ...]:
    fields = (flat._fqns, flat._shapes, flat._numels, flat._shard_param_infos)
    members = []
    for fqn, shape, numel, info in zip(*fields, strict=True):
        if math.prod(shape) != numel:  # the private fields are not what this module reads
            raise RuntimeError(f"FlatParameter member {fqn}: shape {tuple(shape)}, numel {numel}")
        here = info.in_shard
        members.append(
            FlatMember(
                fqn=fqn,
                shape=tuple(shape),
                offset=info.offset_in_shard if here else None,
                numel=info.numel_in_shard if here else 0,
                start=info.intra_param_start_idx if here else None,
            )
        )
    return tuple(members)


FRAMEWORK = Framework(
    name="fsdp1_flat", mesh_dims=("shard",), parallelize=parallelize, flat_members=flat_members
)
