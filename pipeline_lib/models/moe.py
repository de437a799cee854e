"""moe: a tiny decoder whose feed-forward is a mixture of experts, as torchtitan's MoE: a router
(a linear gate, softmax scores, top-k experts per token), packed routed experts (SwiGLU weights
``[num_experts, ...]``: expert parallelism shards them on dim 0) and a shared expert every token
goes through.

Router state (torchtitan's auxiliary-loss-free load balancing): a persistent buffer
``expert_bias`` added to the scores when choosing experts. Before each optimizer step
(``load_balance``, an optimizer step pre-hook the worker registers) the tokens each expert got
in the step are summed over every data-parallel rank and the bias moves each expert toward the
mean load (``coeff * sign(mean - tokens)``, less its mean). So the bias depends on the whole
training history: a load that misses it, or a resume that gets it wrong, routes other tokens.
Unlike torchtitan it starts from the init seed, not zeros (a load that leaves the loader's own
value cannot pass). The step's counts are a plain attribute, not a buffer (torchtitan's
non-persistent ``tokens_per_expert``): a model materialized empty (load_init meta) has nothing
to re-initialize.

Every forward counts, as torchtitan's does: under pipeline parallelism that includes the extra
forward torch.distributed.pipelining runs in a schedule's first step (its metadata inference,
on uninitialized tensors after the first stage), a finding (docs/findings.md,
scripts/repro/pp_metadata_inference_forward.py).

Routing is deterministic on the CPU: top-k of the same scores gives the same experts, tokens are
grouped by expert with a stable sort, outputs summed with ``index_add_`` in that order.
"""

import functools

import torch
from torch import nn

from pipeline_lib.models.transformer import Attention, FeedForward, Transformer

LOAD_BALANCE_COEFF = 1e-3


class GroupedExperts(nn.Module):
    """``num_experts`` SwiGLU experts packed in three 3-D weights (torchtitan's GroupedExperts).
    forward(tokens sorted by expert, tokens per expert): each expert's rows through its weights;
    under expert parallelism this rank's experts only (the local part of a DTensor)."""

    def __init__(self, dim: int, hidden: int, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.randn(num_experts, hidden, dim) * dim**-0.5)
        self.w2 = nn.Parameter(torch.randn(num_experts, dim, hidden) * hidden**-0.5)
        self.w3 = nn.Parameter(torch.randn(num_experts, hidden, dim) * dim**-0.5)

    def forward(self, tokens: torch.Tensor, per_expert: torch.Tensor) -> torch.Tensor:
        from pipeline_lib.models._expert_parallel import (
            local,  # imports torch.distributed only here
        )

        w1, w2, w3 = local(self.w1), local(self.w2), local(self.w3)
        outputs = []
        for e, rows in enumerate(tokens.split(per_expert.tolist())):
            h = nn.functional.silu(rows @ w1[e].t()) * (rows @ w3[e].t())
            outputs.append(h @ w2[e].t())
        return torch.cat(outputs) if outputs else tokens[:0]


class MoE(nn.Module):
    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = GroupedExperts(dim, hidden, num_experts)
        self.shared_expert = FeedForward(dim, hidden)
        self.register_buffer("expert_bias", 1e-3 * torch.randn(num_experts))
        self.routed = None  # tokens per expert since the last load_balance (this rank's)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        scores = nn.functional.softmax(self.gate(x).float(), dim=-1)
        _, chosen = torch.topk(scores + self.expert_bias, self.top_k, dim=-1)
        weights = scores.gather(1, chosen)  # the bias chooses, the scores weigh
        per_expert = torch.bincount(chosen.reshape(-1), minlength=self.num_experts)
        self.routed = per_expert if self.routed is None else self.routed + per_expert
        order = torch.argsort(chosen.reshape(-1), stable=True)
        token = order // self.top_k
        routed = x[token] * weights.reshape(-1)[order, None].to(x.dtype)
        out = self.experts(routed, per_expert)
        return self.shared_expert(x).index_add(0, token, out).reshape(shape)

    def take_routed(self) -> torch.Tensor:
        """The tokens per expert routed since the last call (zeros if none), and reset."""
        routed = self.routed if self.routed is not None else torch.zeros(self.num_experts)
        self.routed = None
        return routed.float()

    @torch.no_grad()
    def balance(self, tokens: torch.Tensor) -> None:
        """Move the bias toward the mean load, given every rank's tokens per expert."""
        delta = LOAD_BALANCE_COEFF * torch.sign(tokens.mean() - tokens)
        self.expert_bias.add_((delta - delta.mean()).to(self.expert_bias))


class MoEBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, num_experts: int, top_k: int):
        super().__init__()
        self.attention_norm = nn.RMSNorm(dim)
        self.attention = Attention(dim, heads)
        self.moe_norm = nn.RMSNorm(dim)
        self.moe = MoE(dim, hidden, num_experts, top_k)

    def forward(self, x):
        x = x + self.attention(self.attention_norm(x))
        return x + self.moe(self.moe_norm(x))


class MoEDecoder(Transformer):
    """transformer's decoder with MoEBlock layers: the same names but ``ffn`` (``moe``)."""

    COLWISE = ("attention.wq", "attention.wk", "attention.wv", "moe.shared_expert.w1")
    ROWWISE = ("attention.wo", "moe.shared_expert.w2")

    def __init__(
        self, vocab=64, dim=16, heads=2, hidden=16, layers=2, seq_len=8, experts=8, top_k=2
    ):
        block = functools.partial(MoEBlock, num_experts=experts, top_k=top_k)
        super().__init__(vocab, dim, heads, hidden, layers, seq_len, block=block)
        self.num_layers, self.num_experts = layers, experts

    def ep_plan(self):
        """Expert parallelism: every layer's packed experts (models._expert_parallel)."""
        from pipeline_lib.models._expert_parallel import ExpertParallel

        held = self.layers.named_children()  # a pipeline stage's layers keep their index
        return {f"layers.{i}.moe.experts": ExpertParallel() for i, _ in held}

    def load_balance(self, sum_over_ranks) -> None:
        """Before an optimizer step: every layer's tokens per expert summed over the
        data-parallel ranks (``sum_over_ranks`` sums a tensor over every rank in place, as one
        collective whatever the stage: a pipeline stage fills the rows of its own layers), then
        each layer's bias updated."""
        held = dict(self.layers.named_children())
        tokens = torch.zeros(self.num_layers, self.num_experts)
        for i, layer in held.items():
            tokens[int(i)] = layer.moe.take_routed().cpu()
        tokens = sum_over_ranks(tokens)
        for i, layer in held.items():
            layer.moe.balance(tokens[int(i)])


def build(**dims) -> MoEDecoder:
    return MoEDecoder(**dims)
