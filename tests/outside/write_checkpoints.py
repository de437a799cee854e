"""Checkpoints this project did not write: each model trained two steps under FSDP2 on 2 ranks
and saved with ``torch.distributed.checkpoint`` the way other jobs lay their checkpoints out,
with plain torch and transformers. No dcp-matrix code runs here: the models are built the way
a user builds them (the built-in ``mlp`` by its module, ``examples/my_model.py`` by import, a
``transformers`` Llama from its config); training, the optimizer, the LR scheduler and the
save are this script's own.

    PYTHONPATH=. torchrun --nproc-per-node 2 tests/outside/write_checkpoints.py FOLDER

writes one DCP folder per entry of ``CHECKPOINTS`` under FOLDER (tests/test_existing.py loads
each through the config key ``checkpoints`` under every layout).
"""

from __future__ import annotations

import os
import pickle
import sys
from dataclasses import dataclass

# The hf_models entry the loading grid names (tests/test_existing.py): the same architecture
# and config, built here with transformers alone.
LLAMA = {
    "architecture": "LlamaForCausalLM",
    "config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 64,
    },
}
MY_MODEL = "examples.my_model:build"
STEPS = 2


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint: its model (as the loading grid names it), the layout of its entries
    (``layout``), its optimizer's form and whether an LR scheduler is saved with it."""

    name: str
    model: str  # mlp, MY_MODEL or llama
    layout: str  # torchtitan, torchtitan_objects, dcp_matrix, mine
    flattened: bool  # flatten_optimizer_state_dict (param groups keyed by parameter)
    scheduler: bool


# Every model kind under every naming; the optimizer flattened (param groups keyed by
# parameter) or by group index, with an LR scheduler or without.
CHECKPOINTS = (
    # torchtitan's CheckpointManager: model FQNs at the top level, the optimizer flattened,
    # lr_scheduler, dataloader and train_state (AdamW with weight decay, a LambdaLR).
    Checkpoint("mlp_torchtitan", "mlp", "torchtitan", flattened=True, scheduler=True),
    Checkpoint("llama_torchtitan", "llama", "torchtitan", flattened=True, scheduler=True),
    # The same layout as DCP up to torch 2.3 wrote it (and torchtitan as measured): a dict
    # holding no tensor (the LR scheduler's, the data loader's) is one object entry.
    Checkpoint("my_model_torchtitan", MY_MODEL, "torchtitan_objects", True, scheduler=True),
    # {"model": ..., "optim": ..., "scheduler": ...}.
    Checkpoint("mlp_dcp_matrix", "mlp", "dcp_matrix", flattened=False, scheduler=False),
    Checkpoint("my_model_dcp_matrix", MY_MODEL, "dcp_matrix", flattened=False, scheduler=True),
    Checkpoint("llama_dcp_matrix", "llama", "dcp_matrix", flattened=False, scheduler=False),
    # A trainer's own keys ({"net": ..., "opt": ..., "sched": ...}), named by
    # tests/outside/names.py.
    Checkpoint("mlp_mine", "mlp", "mine", flattened=True, scheduler=False),
    Checkpoint("my_model_mine", MY_MODEL, "mine", flattened=False, scheduler=False),
    Checkpoint("llama_mine", "llama", "mine", flattened=True, scheduler=True),
)


def build(model: str):
    """The model, as its user builds it (the same seed on every rank: one init)."""
    import torch

    torch.manual_seed(0)
    if model == "mlp":
        from pipeline_lib.models import mlp  # the built-in model's own module

        return mlp.build()
    if model == MY_MODEL:
        from examples import my_model

        return my_model.build()
    import transformers

    config = transformers.LlamaConfig(**LLAMA["config"], attn_implementation="eager")
    return transformers.LlamaForCausalLM(config)


def blocks(model) -> list:
    """The blocks FSDP2 shards one by one (then the root)."""
    if hasattr(model, "model"):  # transformers: the decoder layers
        return list(model.model.layers)
    return list(model.blocks)


def loss(model, step: int, rank: int):
    """This rank's loss on its own batch of the step (random data: any values do)."""
    import torch

    gen = torch.Generator().manual_seed(1000 * step + rank)
    if hasattr(model, "model"):
        ids = torch.randint(LLAMA["config"]["vocab_size"], (2, 8), generator=gen)
        return model(input_ids=ids, labels=ids).loss
    return model(torch.randn(4, 16, generator=gen)).square().mean()


def optimizer(model, scheduler: bool):
    """AdamW with weight decay: one param group with an LR scheduler (as the loading grid's
    recipe adam_lr_warmup has), else two, as its adamw_param_groups splits them: matrices
    decay at lr, biases and norms do not, at lr / 10."""
    import torch

    if scheduler:
        return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    decay, rest = [], []
    for name, param in model.named_parameters():
        module, _, leaf = name.rpartition(".")
        (rest if leaf == "bias" or module.endswith("norm") else decay).append(param)
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}]
    groups[1]["lr"] = 0.001
    return torch.optim.AdamW(groups, lr=0.01)


def train(spec: Checkpoint, rank: int, mesh):
    import torch
    from torch.distributed.fsdp import fully_shard

    model = build(spec.model)
    for block in blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = optimizer(model, spec.scheduler)
    warmup = lambda step: min(1.0, (step + 1) / 4)  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optim, warmup) if spec.scheduler else None
    for step in range(STEPS):
        loss(model, step, rank).backward()
        optim.step()
        optim.zero_grad()
        if scheduler is not None:
            scheduler.step()
    return model, optim, scheduler


def state(spec: Checkpoint, rank: int, model, optim, scheduler) -> dict:
    """The checkpoint's state in the writer's layout."""
    import torch
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(flatten_optimizer_state_dict=spec.flattened)
    model_state = get_model_state_dict(model)
    optim_state = get_optimizer_state_dict(model, optim, options=options)
    keys = {"mine": ("net", "opt", "sched"), "dcp_matrix": ("model", "optim", "scheduler")}
    if spec.layout in keys:
        model_key, optim_key, scheduler_key = keys[spec.layout]
        found = {model_key: model_state, optim_key: optim_state}
        return {**found, scheduler_key: scheduler} if scheduler is not None else found
    found = {
        **model_state,
        "optimizer": optim_state,
        # torchtitan's data loader: its own state pickled, by data-parallel rank.
        "dataloader": {f"dp_rank_{rank}": pickle.dumps({"step": STEPS}), "world_size": 2},
        "train_state": {"step": torch.tensor(STEPS)},
    }
    return {**found, "lr_scheduler": scheduler.state_dict()} if scheduler is not None else found


def save(spec: Checkpoint, folder: str, found: dict) -> None:
    """``dcp.save``; layout torchtitan_objects: the entries flattened here, the LR scheduler's
    and the data loader's dicts left whole (one object entry each)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultSavePlanner

    if spec.layout != "torchtitan_objects":
        dcp.save(found, checkpoint_id=folder)
        return
    whole = ("lr_scheduler", "dataloader")
    flat = {k: v for k, v in found.items() if k in whole or not isinstance(v, dict)}
    for key, value in found.items():
        if key not in whole and isinstance(value, dict):
            flat.update({f"{key}.{name}": v for name, v in value.items()})
    dcp.save(flat, checkpoint_id=folder, planner=DefaultSavePlanner(flatten_state_dict=False))


def main() -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for spec in CHECKPOINTS:
        model, optim, scheduler = train(spec, rank, mesh)
        save(spec, os.path.join(out, spec.name), state(spec, rank, model, optim, scheduler))
    writers = sorted(m for m in sys.modules if m.startswith("pipeline_lib"))
    allowed = {
        "pipeline_lib",
        "pipeline_lib.models",
        "pipeline_lib.common",
        "pipeline_lib.common.registry",
    }
    allowed |= {"pipeline_lib.models.mlp", "pipeline_lib.models._common"}
    assert set(writers) <= allowed, f"dcp-matrix code ran in the writer: {writers}"
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
