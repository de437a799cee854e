"""FSDP1's own state-dict API, as accelerate and older trainers use it (mode / load_mode
``legacy``): ``FSDP.state_dict_type(model, SHARDED_STATE_DICT)``, then ``model.state_dict()``
(ShardedTensors when FSDP1 has no device mesh, DTensors with one) and
``FSDP.optim_state_dict``; loaded with ``model.load_state_dict``,
``load_sharded_optimizer_state_dict`` and
``optim.load_state_dict(FSDP.optim_state_dict_to_load(...))``. Public FSDP1 APIs only; FSDP1
layouts only (pipeline_lib.plan.axes.layout_conflict). Imports torch; collectives on all ranks."""

from __future__ import annotations

import torch.distributed.checkpoint as dcp
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import StateDictType


def state_dict(model, optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state) under SHARDED_STATE_DICT."""
    with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
        return model.state_dict(), FSDP.optim_state_dict(model, optimizer)


def load(model, optimizer, state: dict, reader, planner) -> None:
    """The checkpoint read into ``state`` (the loader's legacy state dict: model, optim and
    Stateful entries) and into the model and optimizer the way torch documents for FSDP1
    (``load_sharded_optimizer_state_dict``'s docstring; accelerate loads so): dcp.load of all
    but the optimizer, ``model.load_state_dict``, then the optimizer state as the checkpoint's
    metadata lists it (a fresh optimizer's own state dict has no state to load into).
    ``reader``: a new storage reader per call; ``planner``: a new load planner per call."""
    from torch.distributed.checkpoint.optimizer import load_sharded_optimizer_state_dict

    rest = {key: value for key, value in state.items() if key != "optim"}
    dcp.load(rest, storage_reader=reader(), planner=planner())
    with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
        model.load_state_dict(state["model"])
        optim = load_sharded_optimizer_state_dict(state["model"], "optim", reader(), planner())
        optimizer.load_state_dict(FSDP.optim_state_dict_to_load(model, optimizer, optim["optim"]))
