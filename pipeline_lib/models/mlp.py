"""mlp: two residual MLP blocks and a head; all dims divisible by 2 and 4."""

import torch
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from pipeline_lib.models._common import step_generator


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int, blocks: int = 2):
        super().__init__()
        self.dim, self.hidden = dim, hidden
        self.blocks = nn.ModuleList(Block(dim, hidden) for _ in range(blocks))
        self.head = nn.Linear(dim, out)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def make_batch(self, step: int, global_batch: int, seed: int):
        gen = step_generator(seed, step)
        inputs = torch.randn(global_batch, self.dim, generator=gen)
        targets = torch.randn(global_batch, self.head.out_features, generator=gen)
        return inputs, targets

    def loss_sum(self, outputs, targets):
        return nn.functional.mse_loss(outputs, targets, reduction="sum"), targets.numel()

    def fsdp_units(self):
        return list(self.blocks)

    def tp_plan(self):
        plan = {}
        for i in range(len(self.blocks)):
            plan[f"blocks.{i}.fc1"] = ColwiseParallel()
            plan[f"blocks.{i}.fc2"] = RowwiseParallel()
        return plan

    def tp_dims(self):
        # No size of its arithmetic needs whole parts per TP rank: an uneven hidden is torch's.
        return {}


DIMS = {"dim": 16, "hidden": 32, "out": 8}


def build(**dims) -> MLP:
    return MLP(**{**DIMS, **dims})
