"""Optimizer recipes (the ``train.optimizer`` axis): name -> (optimizer, LR scheduler or None).

Only trainable parameters are optimized (frozen ones have no gradient and no state).
"""

from __future__ import annotations

import torch

# LR warm-up length in steps: the restored schedule must continue mid warm-up for the resume
# check to see a scheduler that was not restored (its lr would start again from step 0).
WARMUP_STEPS = 8


def make(name: str, model: torch.nn.Module, lr: float):
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr), None
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01), None
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9), None
    if name == "adamw_param_groups":
        # Matrices decay at lr; biases and norms do not, at lr / 10 (two groups, two lrs).
        matrices = [p for p in params if p.ndim >= 2]
        others = [p for p in params if p.ndim < 2]
        groups = [
            {"params": matrices, "lr": lr, "weight_decay": 0.01},
            {"params": others, "lr": lr / 10, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups), None
    if name == "adam_lr_warmup":
        optimizer = torch.optim.Adam(params, lr=lr)
        warmup = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / WARMUP_STEPS)
        )
        return optimizer, warmup
    raise KeyError(f"unknown optimizer {name!r}")
