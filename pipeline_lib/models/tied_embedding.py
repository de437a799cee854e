"""tied_embedding: input embedding and output head share one weight; one persistent buffer (in
the state dict, must be restored) and one non-persistent buffer (not in the state dict)."""

import torch
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from pipeline_lib.models._common import cross_entropy_sum, token_batch
from pipeline_lib.models.mlp import Block


class TiedEmbedding(nn.Module):
    def __init__(self, vocab=48, dim=24, hidden=32, seq_len=6):
        super().__init__()
        self.vocab, self.hidden, self.seq_len = vocab, hidden, seq_len
        self.embedding = nn.Embedding(vocab, dim)
        self.block = Block(dim, hidden)
        self.output = nn.Linear(dim, vocab, bias=False)
        self.output.weight = self.embedding.weight
        # Random init, so a loader with a different seed differs until the load restores it.
        self.register_buffer("feature_scale", 1.0 + 0.1 * torch.randn(dim))
        self.register_buffer(
            "position_bias", torch.linspace(-0.1, 0.1, seq_len)[:, None], persistent=False
        )

    def forward(self, tokens):
        x = self.embedding(tokens) + self.position_bias[: tokens.shape[1]]
        return self.output(self.block(x) * self.feature_scale)

    def make_batch(self, step: int, global_batch: int, seed: int):
        return token_batch(step, global_batch, seed, self.vocab, self.seq_len)

    def loss_sum(self, outputs, targets):
        return cross_entropy_sum(outputs, targets)

    def fsdp_units(self):
        # The tied weight lives in the root unit: both its users must see one parameter.
        return [self.block]

    def tp_plan(self):
        return {"block.fc1": ColwiseParallel(), "block.fc2": RowwiseParallel()}

    def tp_dims(self):
        return {}  # no size its arithmetic needs whole per TP rank (mlp.MLP.tp_dims)


def build() -> TiedEmbedding:
    return TiedEmbedding()
