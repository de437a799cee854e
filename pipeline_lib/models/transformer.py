"""transformer: a tiny decoder: token and position embeddings, causal attention, MLP, RMSNorm
and an output head."""

import torch
from torch import nn
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from pipeline_lib.models._common import cross_entropy_sum, token_batch


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.head_dim = dim // heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        # -1 heads: under TP each rank holds heads / tp of them.
        q, k, v = (
            w(x).view(b, s, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv)
        )
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.w2(nn.functional.gelu(self.w1(x)))


class DecoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.attention_norm = nn.RMSNorm(dim)
        self.attention = Attention(dim, heads)
        self.ffn_norm = nn.RMSNorm(dim)
        self.ffn = FeedForward(dim, hidden)

    def forward(self, x):
        x = x + self.attention(self.attention_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    """The decoder's scaffolding; ``block(dim, heads, hidden)`` makes each layer (models.moe
    passes its mixture-of-experts block). The blocks' TP plan names their projections in
    COLWISE and ROWWISE."""

    COLWISE = ("attention.wq", "attention.wk", "attention.wv", "ffn.w1")
    ROWWISE = ("attention.wo", "ffn.w2")

    def __init__(
        self, vocab=64, dim=32, heads=4, hidden=64, layers=2, seq_len=8, block=DecoderBlock
    ):
        super().__init__()
        self.vocab, self.heads, self.hidden, self.seq_len = vocab, heads, hidden, seq_len
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.pos_embeddings = nn.Parameter(torch.randn(seq_len, dim) * 0.02)
        self.layers = nn.ModuleList(block(dim, heads, hidden) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        # A pipeline stage holds some of the parts (the others are None): it takes the previous
        # stage's output and returns its own (pipeline_lib.job.pipelining).
        x = tokens
        if self.tok_embeddings is not None:
            x = self.tok_embeddings(tokens) + self.pos_embeddings[: tokens.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return x if self.output is None else self.output(self.norm(x))

    def make_batch(self, step: int, global_batch: int, seed: int):
        return token_batch(step, global_batch, seed, self.vocab, self.seq_len)

    def loss_sum(self, outputs, targets):
        return cross_entropy_sum(outputs, targets)

    def fsdp_units(self):
        return list(self.layers)

    def tp_plan(self):
        plan = {
            "tok_embeddings": RowwiseParallel(
                input_layouts=Replicate(), output_layouts=Replicate()
            ),
            "output": ColwiseParallel(output_layouts=Replicate()),
        }
        for i, _ in self.layers.named_children():  # a pipeline stage's layers keep their index
            for name in self.COLWISE:
                plan[f"layers.{i}.{name}"] = ColwiseParallel()
            for name in self.ROWWISE:
                plan[f"layers.{i}.{name}"] = RowwiseParallel()
        return plan

    def pipeline_split(self):
        """(layer stack, the parts before it, the parts after it) for pipeline stages."""
        return "layers", ["tok_embeddings", "pos_embeddings"], ["norm", "output"]

    def tp_dims(self):
        """The attention views each rank's projections as whole heads: the TP degree must
        divide them. The vocabulary and the feed-forward size are torch's to shard unevenly."""
        return {"heads": self.heads}


def build() -> Transformer:
    return Transformer()
