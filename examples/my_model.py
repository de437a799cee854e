"""A worked example of your own model (docs/extending.md, "Your own model"): a gated MLP
(SwiGLU blocks with pre-LayerNorm and residuals), named in a config as
``examples.my_model:build``.

The contract: ``build`` returns the module; ``make_inputs`` draws a batch from the generator it
is given; ``tp_plan`` and ``fsdp_units`` are optional.
"""

import torch
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

DIM = 16


class GatedBlock(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


class GatedMLP(nn.Module):
    def __init__(self, dim: int = DIM, hidden: int = 48, out: int = 4, blocks: int = 2):
        super().__init__()
        self.blocks = nn.Sequential(*(GatedBlock(dim, hidden) for _ in range(blocks)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out)

    def forward(self, x):
        return self.head(self.norm(self.blocks(x)))


def build(**kwargs) -> GatedMLP:
    return GatedMLP(**kwargs)


def make_inputs(batch_size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(batch_size, DIM, generator=generator)


def tp_plan(model: GatedMLP) -> dict:
    # gate and up split the hidden dim, down sums it back: the blocks' outputs stay whole.
    return {
        "blocks.*.gate": ColwiseParallel(),
        "blocks.*.up": ColwiseParallel(),
        "blocks.*.down": RowwiseParallel(),
    }


def fsdp_units(model: GatedMLP) -> list[nn.Module]:
    return list(model.blocks)
