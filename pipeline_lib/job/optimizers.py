"""Optimizer recipes (the ``optimizer`` axis): name -> (optimizer, LR scheduler or None).

Only trainable parameters are optimized (frozen ones have no gradient and no state).
"""

from __future__ import annotations

import torch

# LR warm-up length in steps: the restored schedule must continue mid warm-up for the resume
# check to see a scheduler that was not restored (its lr would start again from step 0).
WARMUP_STEPS = 8


def no_decay(name: str) -> bool:
    """Biases and norm weights, told by name as Hugging Face's trainers do: under FSDP1 every
    parameter is a flat shard, so its shape cannot tell a matrix from a bias."""
    module, _, leaf = name.rpartition(".")
    return leaf == "bias" or module.endswith("norm")


# Recipes that put a model's parameters into param groups by name: under a framework whose
# parameters are flat over several original ones (FSDP1 use_orig_params=False) they cannot.
GROUPS_BY_NAME = frozenset({"adamw_param_groups"})


def make(name: str, model: torch.nn.Module, lr: float):
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr), None
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01), None
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9), None
    if name == "sgd_plain":  # no momentum: no per-parameter state at all
        return torch.optim.SGD(params, lr=lr), None
    if name == "adamw_param_groups":
        # Matrices decay at lr; biases and norms do not, at lr / 10 (two groups, two lrs).
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [
            {
                "params": [p for n, p in trainable if not no_decay(n)],
                "lr": lr,
                "weight_decay": 0.01,
            },
            {
                "params": [p for n, p in trainable if no_decay(n)],
                "lr": lr / 10,
                "weight_decay": 0.0,
            },
        ]
        return torch.optim.AdamW(groups), None
    if name == "adam_lr_warmup":
        optimizer = torch.optim.Adam(params, lr=lr)
        warmup = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / WARMUP_STEPS)
        )
        return optimizer, warmup
    raise KeyError(f"unknown optimizer {name!r}")
