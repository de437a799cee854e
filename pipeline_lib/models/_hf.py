"""A Hugging Face architecture as ``transformers`` ships it, named in the config without a Python
file (``hf_models: {name: {architecture, config, seq_len}}``, docs/extending.md).

Built from the architecture's own config class with random init (torch is seeded before the
build, as for every model), eager attention and every dropout 0 unless the config says
otherwise; nothing is downloaded (HF_HUB_OFFLINE=1, no ``from_pretrained`` of a hub id). The
model runs as a ``_user.UserModel`` whose functions (``HFFunctions``) come from here:
``make_inputs`` (token ids from the step's generator; ``labels = input_ids`` for a causal LM),
``fsdp_units`` (the decoder layers), ``tp_plan`` (the config's ``base_model_tp_plan`` mapped to
torch's styles, ``TP_STYLES``) and ``tp_dims`` (heads and key/value heads).

An entry's ``lora`` adds LoRA adapters with peft (models._lora, imported only then).

Imports transformers: only for models that need it (models.get imports this module lazily).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it

import torch
import transformers
from torch import nn
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel
from transformers import PretrainedConfig

from pipeline_lib.common.errors import Incompatible
from pipeline_lib.models._user import CAUSAL_LM_SUFFIXES, UserModel, _plan_targets

DEFAULT_SEQ_LEN = 8
# Config attributes that are dropout probabilities: 0 unless the config sets them (dropout
# draws from each rank's RNG, so layouts would train on different masks).
_DROPOUT_SUFFIXES = ("dropout", "pdrop")

# transformers' TP style -> torch's, on the module types it may shard. The plan keeps the model's
# output whole on every TP rank: a colwise layer is followed by a rowwise one, whose output is
# replicated. "replicate" styles need no plan entry. Every other style (sequence_parallel,
# packed_*, local_*, gather, moe_*, ep_*, grouped_gemm, ...) makes the TP cell a skip.
TP_STYLES: dict[str, tuple[Any, tuple[type, ...]]] = {
    "colwise": (lambda: ColwiseParallel(), (nn.Linear,)),
    "rowwise": (lambda: RowwiseParallel(), (nn.Linear,)),
    "colwise_rep": (lambda: ColwiseParallel(output_layouts=Replicate()), (nn.Linear,)),
    "colwise_gather_output": (lambda: ColwiseParallel(output_layouts=Replicate()), (nn.Linear,)),
    "rowwise_rep": (lambda: RowwiseParallel(input_layouts=Replicate()), (nn.Linear,)),
    "embedding_rowwise": (
        lambda: RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        (nn.Embedding,),
    ),
}
REPLICATED_STYLES = ("replicate", "replicated_with_grad_allreduce")
# The name ending of transformers' base classes (PreTrainedModel, LlamaPreTrainedModel, ...).
_BASE = "PreTrainedModel"


@dataclass(frozen=True)
class HFModelDefinition:
    """One ``hf_models`` entry: the architecture (a transformers class name), its config's
    values, and the length of the token sequences the model trains on."""

    architecture: str
    config: dict = field(default_factory=dict)
    seq_len: int = DEFAULT_SEQ_LEN
    lora: dict | None = None  # LoRA adapters (models._lora), or none

    @classmethod
    def from_dict(cls, data: dict) -> HFModelDefinition:
        config, seq_len = dict(data.get("config", {})), data.get("seq_len", 8)
        return cls(data["architecture"], config, seq_len, data.get("lora"))

    @property
    def model_class(self) -> type:
        """The architecture's class: a transformers model class with a config class of its own;
        ValueError for anything else (not a model, or a base class: ``PreTrainedModel``,
        ``LlamaPreTrainedModel``, which build no layers)."""
        found = getattr(transformers, self.architecture, None)
        if not (isinstance(found, type) and issubclass(found, transformers.PreTrainedModel)):
            raise ValueError(f"transformers has no model class {self.architecture!r}")
        config_class = getattr(found, "config_class", None)
        configured = isinstance(config_class, type) and issubclass(config_class, PretrainedConfig)
        if not configured or config_class is PretrainedConfig or found.__name__.endswith(_BASE):
            raise ValueError(
                f"{self.architecture} is a base class of transformers' models (it builds no "
                "layers); name an architecture, e.g. LlamaForCausalLM"
            )
        return found

    def make_config(self):
        config_class = self.model_class.config_class
        defaults = config_class()
        unknown = sorted(k for k in self.config if not hasattr(defaults, k))
        if unknown:
            raise ValueError(f"{config_class.__name__} has no {', '.join(map(repr, unknown))}")
        no_dropout = {
            k: 0.0 for k in vars(defaults) if k.endswith(_DROPOUT_SUFFIXES) and k not in self.config
        }
        values = {"attn_implementation": "eager", **no_dropout, **self.config}
        return config_class(**values)

    def build(self) -> nn.Module:
        return self.model_class(self.make_config())


def definition_error(data: dict) -> str | None:
    """Why an ``hf_models`` entry cannot build, or None: ``<field>: <why>``, the field relative
    to the entry (builds its config, not the model)."""
    definition = HFModelDefinition.from_dict(data)
    try:
        config_class = definition.model_class.config_class
    except ValueError as exc:
        return f"architecture: {exc}"
    defaults = config_class()
    for key in definition.config:
        if not hasattr(defaults, key):
            return f"config.{key}: {config_class.__name__} has no {key!r}"
    try:
        config = definition.make_config()
    except Exception as exc:  # transformers' own checks: ValueError, TypeError, ...
        return "config: " + " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and definition.seq_len > positions:
        return f"seq_len: {definition.seq_len} exceeds max_position_embeddings {positions}"
    if not hasattr(config, "vocab_size"):
        return f"architecture: {type(config).__name__} has no vocab_size to draw token ids from"
    return None


def _layer(module: nn.Module) -> nn.Module:
    """The layer a TP style shards: a peft-adapted layer's base layer (models._lora maps the
    plan to it and its adapter), any other module itself."""
    return getattr(module, "base_layer", module)


def _index(children: list, name: str) -> int:
    return [n for n, _ in children].index(name)


@dataclass(frozen=True)
class HFModelSource:
    """What ``models.get`` returns for an ``hf_models`` name: ``build(hf=definition)``."""

    name: str

    def build(self, hf: dict, base_seed: int | None = None) -> UserModel:
        """``base_seed``: the seed of a LoRA model's base (models._lora.LoRAModelSource); a
        model without adapters has one seed."""
        definition = HFModelDefinition.from_dict(hf)
        model = definition.build()
        return UserModel(self.name, HFFunctions(self.name, definition, model.config), model)


@dataclass(frozen=True)
class HFFunctions:
    """The functions a user's module provides (models._user), for a transformers model."""

    name: str
    definition: HFModelDefinition
    config: Any  # the model's PretrainedConfig

    def make_inputs(self, batch_size: int, generator: torch.Generator) -> dict:
        shape = (batch_size, self.definition.seq_len)
        ids = torch.randint(self.config.vocab_size, shape, generator=generator)
        if self.definition.architecture.endswith(CAUSAL_LM_SUFFIXES):
            return {"input_ids": ids, "labels": ids}
        return {"input_ids": ids}

    def fsdp_units(self, model: nn.Module) -> list[nn.Module]:
        """The decoder layers: every block of a ModuleList of the base model (``model.layers``,
        GPT-2's ``transformer.h``). Embeddings, final norm and head stay in the root unit, so
        tied embeddings are one parameter in one unit."""
        blocks = model.base_model.children()
        return [layer for child in blocks if isinstance(child, nn.ModuleList) for layer in child]

    def pipeline_split(self, model: nn.Module):
        """(the decoder's layer stack, its embeddings, its final norm and the head) by module
        order in the base model; None (no pipeline stages) without one ModuleList of layers, or
        with input and output embeddings tied (one weight on the first and the last stage)."""
        if getattr(self.config, "tie_word_embeddings", False):
            return None
        prefix = model.base_model_prefix
        children = list(model.base_model.named_children())
        stacks = [i for i, (_, child) in enumerate(children) if isinstance(child, nn.ModuleList)]
        if len(stacks) != 1 or model.get_output_embeddings() is None:
            return None
        holds = [(n, c) for n, c in children if any(True for _ in c.parameters(recurse=True))]
        before = [f"{prefix}.{n}" for n, c in holds if _index(children, n) < stacks[0]]
        after = [f"{prefix}.{n}" for n, c in holds if _index(children, n) > stacks[0]]
        head = next(n for n, m in model.named_children() if m is model.get_output_embeddings())
        return f"{prefix}.{children[stacks[0]][0]}", before, [*after, head]

    def pipeline_stand_in(self) -> nn.Module:
        """transformers' forwards call their norm and head whatever the stage: an identity."""
        return nn.Identity()

    def stage_forward(self, model: nn.Module, inputs):
        """A pipeline stage's forward: token ids on the first stage (its embeddings), the
        previous stage's hidden states on the others; the logits (the hidden states where the
        norm and head are identities)."""
        if isinstance(inputs, dict):
            return model(input_ids=inputs["input_ids"]).logits
        return model(inputs_embeds=inputs).logits

    def stage_outputs(self, model: nn.Module, logits, batch: dict) -> dict:
        """The last stage's logits with the loss the model's forward computes from them."""
        if "labels" not in batch:
            return logits
        loss = model.loss_function(logits, batch["labels"], vocab_size=self.config.vocab_size)
        return {"logits": logits, "loss": loss}

    def tp_plan(self, model: nn.Module) -> dict:
        """The config's ``base_model_tp_plan``, keys under the base model's prefix, as torch
        styles; Incompatible (a skip) for a style or module it cannot apply."""
        source = getattr(self.config, "base_model_tp_plan", None)
        if not source:
            raise Incompatible(f"{self.name}: {self._no_plan_reason(model)}")
        plan = {}
        for key, style in source.items():
            full_key = f"{model.base_model_prefix}.{key}"
            if style in REPLICATED_STYLES:
                continue
            if style not in TP_STYLES:
                raise Incompatible(
                    f"{self.name}: TP style {style!r} of {key} has no torch equivalent here "
                    f"(mapped: {', '.join(TP_STYLES)})"
                )
            make, types = TP_STYLES[style]
            targets = _plan_targets(model, full_key)
            if not targets:
                raise Incompatible(f"{self.name}: TP plan key {key} ({style}) names no module")
            wrong = [
                f"{fqn} ({type(m).__name__})"
                for fqn, m in targets
                if not isinstance(_layer(m), types)
            ]
            if wrong:
                kinds = "/".join(t.__name__ for t in types)
                raise Incompatible(f"{self.name}: TP style {style!r} needs {kinds}: {wrong[0]}")
            plan[full_key] = make()
        return plan

    def tp_dims(self, model: nn.Module) -> dict[str, int]:
        """Heads and key/value heads: a TP degree must divide both (each rank a whole head)."""
        names = ("num_attention_heads", "num_key_value_heads")
        return {n: getattr(self.config, n) for n in names if getattr(self.config, n, None)}

    def ep_plan(self, model: nn.Module) -> dict:
        """Expert parallelism as transformers ships it (``expert_parallel_plan``)."""
        return expert_parallel_plan(self.name, model)

    def _no_plan_reason(self, model: nn.Module) -> str:
        reason = f"{self.definition.architecture} has no base_model_tp_plan in its config"
        if any(type(m).__name__ == "Conv1D" for m in model.modules()):
            reason += (
                " (its Conv1D layers are not nn.Linear: torch's ColwiseParallel and "
                "RowwiseParallel shard nn.Linear and nn.Embedding only)"
            )
        return reason


# --- Mixtures of experts: transformers' own expert parallelism ----------------------------------
# Its experts modules (Mixtral's, Qwen2-MoE's: ``mlp.experts``) pack every expert's weights in
# 3-D parameters (``gate_up_proj`` [experts, 2 x intermediate, hidden], ``down_proj``
# [experts, hidden, intermediate]); the config's ``base_model_ep_plan`` styles them
# ``grouped_gemm`` (Shard(0) on the EP mesh: whole experts per rank) and the module
# ``ep_dispatch_experts`` (the tokens moved to their experts' ranks).
EP_MODULE_STYLE = "ep_dispatch_experts"
EP_PARAM_STYLE = "grouped_gemm"
# transformers' EPImplementation: the (token, expert) pairs sent by all-to-all, as in training.
EP_IMPLEMENTATION = "all_to_all"


def expert_parallel_plan(name: str, model: nn.Module) -> dict:
    """{experts module name: TransformersExpertParallel} from the model's ``ep_plan`` (the
    config's ``base_model_ep_plan`` under the base model's prefix); empty without one;
    Incompatible (a skip) for a style this mapping does not apply."""
    source = dict(getattr(model, "ep_plan", None) or {})
    plan = {}
    for key, style in source.items():
        if style == EP_PARAM_STYLE and key.rpartition(".")[0] in source:
            continue  # a parameter of an experts module below
        if style != EP_MODULE_STYLE:
            raise Incompatible(
                f"{name}: EP style {style!r} of {key} is not applied here "
                f"({EP_MODULE_STYLE} with {EP_PARAM_STYLE} parameters)"
            )
        params = {k.rpartition(".")[2]: s for k, s in source.items() if k.rpartition(".")[0] == key}
        for fqn, _ in _plan_targets(model, key):
            plan[fqn] = TransformersExpertParallel({**params, "": style})
    return plan


class TransformersExpertParallel(ParallelStyle):
    """One experts module under transformers' expert parallelism, applied with transformers'
    ``apply_expert_parallelism`` (its parameters' styles first, then the module's; the plan's
    names relative to the module, ``""`` the module itself): ``grouped_gemm`` shards each packed
    weight on dim 0 and sets the module's ``num_experts`` to its local count,
    ``ep_dispatch_experts`` with ``ep_implementation="all_to_all"`` sends each (token, expert)
    pair to the expert's rank (``AllToAllEP``). Its TP mesh is of size 1: no TP here."""

    def __init__(self, plan: dict[str, str]):
        super().__init__()
        self.plan = plan

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        from transformers.distributed.expert_parallel import apply_expert_parallelism

        from pipeline_lib.models._expert_parallel import dense_mesh

        world = torch.distributed.get_world_size()
        tp_mesh = dense_mesh(device_mesh.device_type, world)["tp"]
        params = {k: s for k, s in self.plan.items() if k}
        ordered = {**params, "": self.plan[""]}
        return apply_expert_parallelism(
            module, device_mesh, tp_mesh, ordered, ep_implementation=EP_IMPLEMENTATION
        )
