"""A torchtitan model as torchtitan ships it, named in the config without a Python file
(``torchtitan_models: {name: {model, flavor, ...}}``, docs/existing-checkpoints.md): the
checkpoints torchtitan's own trainer writes load into torchtitan's own model classes.

No config value names code: ``model`` is a key of ``MODELS``, the allow-list of torchtitan's
model packages this module imports by a fixed name, and ``flavor`` a key of that package's own
config table (``llama3_configs``, ``qwen3_configs``); the rest are numbers and a bool. The model
is built from torchtitan's config (``model_registry(flavor).model``), changed only as the entry
says (fewer layers or experts, separate wq/wk/wv), then ``init_states`` (torch is seeded before
the build, as for every model). Every layer's inner attention is torchtitan's own
``ScaledDotProductAttention`` (causal): its language-model backends cannot train on CPU (flex
has no backward there, varlen needs CUDA, sdpa is refused for language models); with one
document per sample the causal mask is the block-causal one flex would use.

The model runs as a ``_user.UserModel`` whose functions (``TitanFunctions``) come from here:
``make_inputs`` (token ids from the step's generator), ``loss`` (the next-token cross entropy,
as torchtitan's ``cross_entropy_loss`` computes it, a mean), ``fsdp_units`` (the transformer
blocks), ``tp_plan`` (the projections of attention and dense feed-forward, colwise then
rowwise; an MoE layer stays whole on every TP rank) and ``tp_dims`` (heads, key/value heads).

Imports torchtitan: only for models that need it (models.get imports this module lazily).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from pipeline_lib.models._user import UserModel

DEFAULT_SEQ_LEN = 16
# model -> torchtitan's package of it and the name of its flavor table (the allow-list).
MODELS = {"llama3": "llama3_configs", "qwen3": "qwen3_configs"}


@dataclass(frozen=True)
class TitanModelDefinition:
    """One ``torchtitan_models`` entry: torchtitan's model and flavor, what is changed, and
    the length of the token sequences the model trains on."""

    model: str
    flavor: str
    fuse_qkv: bool | None = None  # None: the flavor's own
    n_layers: int | None = None
    num_experts: int | None = None
    top_k: int | None = None
    seq_len: int = DEFAULT_SEQ_LEN

    @classmethod
    def from_dict(cls, data: dict) -> TitanModelDefinition:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def flavors(self) -> dict:
        """torchtitan's flavor table of the model (imports its package: a fixed name)."""
        if self.model not in MODELS:
            known = ", ".join(MODELS)
            raise ValueError(f"unknown torchtitan model {self.model!r} (known: {known})")
        package = importlib.import_module(f"torchtitan.models.{self.model}")
        return getattr(package, MODELS[self.model])

    def config(self):
        """torchtitan's model config of the flavor, changed as the entry says."""
        from torchtitan.models.common.attention import ScaledDotProductAttention

        flavors = self.flavors()
        if self.flavor not in flavors:
            known = ", ".join(flavors)
            raise ValueError(f"torchtitan {self.model} has no flavor {self.flavor!r} ({known})")
        config = flavors[self.flavor](attn_backend="flex")
        if self.n_layers is not None:
            config.layers = config.layers[: self.n_layers]
        for layer in config.layers:
            layer.attention.inner_attention = ScaledDotProductAttention.Config()
            if self.fuse_qkv is False:
                layer.attention.qkv_linear = _unfused(layer.attention)
            if self.num_experts is not None and getattr(layer, "moe", None) is not None:
                layer.moe = _fewer_experts(layer.moe, self.num_experts, self.top_k)
        return config

    def build(self) -> nn.Module:
        model = self.config().build()
        model.init_states()
        return model


def definition_error(data: dict) -> str | None:
    """Why a ``torchtitan_models`` entry cannot build, or None: ``<field>: <why>`` (builds its
    config, not the model; imports torchtitan)."""
    definition = TitanModelDefinition.from_dict(data)
    try:
        flavors = definition.flavors()
    except ValueError as exc:
        return f"model: {exc}"
    if definition.flavor not in flavors:
        return f"flavor: torchtitan {definition.model} has none named {definition.flavor!r}"
    try:
        config = definition.config()
    except Exception as exc:  # torchtitan's own checks
        return "flavor: " + " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
    moe = any(getattr(layer, "moe", None) is not None for layer in config.layers)
    if (definition.num_experts is not None or definition.top_k is not None) and not moe:
        return f"num_experts: torchtitan {definition.model} {definition.flavor} has no MoE layers"
    if definition.num_experts is not None and definition.top_k is None:
        return "top_k: give it with num_experts (tokens per expert choice)"
    return None


def _unfused(attention):
    """torchtitan's separate wq/wk/wv (QKVLinear) of the attention's shapes, as its
    make_gqa_config builds them without fuse_qkv (init: llama3's trunc_normal, std 0.02). Its
    checkpoint names are the fused module's (FusedQKVLinear saves its wqkv as wq, wk, wv)."""
    from torchtitan.models.common.attention import QKVLinear
    from torchtitan.models.common.linear import Linear

    n_kv = attention.n_kv_heads or attention.n_heads
    head_dim = attention.head_dim or attention.dim // attention.n_heads
    init = {"weight": partial(nn.init.trunc_normal_, std=0.02)}
    return QKVLinear.Config(
        head_dim=head_dim,
        wq=Linear.Config(in_features=attention.dim, out_features=attention.n_heads * head_dim,
                         param_init=init),
        wkv=Linear.Config(in_features=attention.dim, out_features=n_kv * head_dim,
                          param_init=init),
    )  # fmt: skip


def _fewer_experts(moe, num_experts: int, top_k: int):
    """An MoE layer's config with ``num_experts`` experts and ``top_k`` per token, by
    torchtitan's own config builders (everything else as the flavor has it)."""
    from torchtitan.models.common.config_utils import (
        make_moe_config,
        make_routed_experts_config,
        make_router_config,
    )

    inner, router = moe.routed_experts.inner_experts, moe.router
    return make_moe_config(
        num_experts=num_experts,
        load_balance_coeff=moe.load_balance_coeff,
        router=make_router_config(
            dim=inner.dim, num_experts=num_experts, gate_param_init=router.gate.param_init,
            top_k=top_k, score_func=router.score_func, route_norm=router.route_norm,
            route_scale=router.route_scale,
        ),
        routed_experts=make_routed_experts_config(
            dim=inner.dim, hidden_dim=inner.hidden_dim, num_experts=num_experts, top_k=top_k,
            param_init=inner.param_init, comm_backend="standard",
        ),
    )  # fmt: skip


@dataclass(frozen=True)
class TitanModelSource:
    """What ``models.get`` returns for a ``torchtitan_models`` name: ``build(torchtitan=…)``."""

    name: str

    def build(self, torchtitan: dict) -> UserModel:
        definition = TitanModelDefinition.from_dict(torchtitan)
        model = definition.build()
        return UserModel(self.name, TitanFunctions(self.name, definition, model.config), model)


# The linear layers of a torchtitan transformer block the TP plan shards, by name.
_COLWISE = ("qkv_linear.wq", "qkv_linear.wk", "qkv_linear.wv", "qkv_linear.wqkv",
            "feed_forward.w1", "feed_forward.w3")  # fmt: skip
_ROWWISE = ("attention.wo", "feed_forward.w2")


@dataclass(frozen=True)
class TitanFunctions:
    """The functions a user's module provides (models._user), for a torchtitan model."""

    name: str
    definition: TitanModelDefinition
    config: Any  # the model's torchtitan config

    def make_inputs(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        shape = (batch_size, self.definition.seq_len)
        return torch.randint(self.config.vocab_size, shape, generator=generator)

    def loss(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The mean next-token cross entropy (token i + 1 from the logits at i), in float32 as
        torchtitan's cross_entropy_loss computes it."""
        predicted = logits[:, :-1].flatten(0, 1).float()
        return nn.functional.cross_entropy(predicted, tokens[:, 1:].flatten(0, 1))

    def fsdp_units(self, model: nn.Module) -> list[nn.Module]:
        """The transformer blocks (torchtitan's apply_fsdp_to_decoder shards each)."""
        return list(model.layers.values())

    def tp_plan(self, model: nn.Module) -> dict:
        """Attention and dense feed-forward projections: colwise in, rowwise out, so each
        block's output is whole on every TP rank; embeddings, norms, MoE layers and the head
        are not sharded. The attention views its projections with -1 heads, so it runs on a
        TP rank's heads as torchtitan's own TP does."""
        plan = {}
        for fqn, module in model.named_modules():
            if isinstance(module, nn.Linear) and fqn.endswith(_COLWISE):
                plan[fqn] = ColwiseParallel()
            elif isinstance(module, nn.Linear) and fqn.endswith(_ROWWISE):
                plan[fqn] = RowwiseParallel()
        return plan

    def tp_dims(self, model: nn.Module) -> dict[str, int]:
        """Heads and key/value heads: a TP degree must divide both (each rank whole heads)."""
        attention = self.config.layers[0].attention
        heads = attention.n_heads
        return {"n_heads": heads, "n_kv_heads": attention.n_kv_heads or heads}
