"""LoRA adapters on an ``hf_models`` architecture (the entry's ``lora`` key, docs/extending.md),
as users add them: peft's ``get_peft_model`` with a ``LoraConfig`` (rank, alpha, target modules,
dropout 0), which freezes the base and leaves the adapters trainable.

The base is built first, from the job's seed or from ``base_seed`` where given (an adapter-only
loader builds the saver's base, as a user resumes adapters on the pretrained model); the adapters
are initialized after it from the job's seed. The model runs as a ``_user.UserModel`` whose
functions (``LoRAFunctions``) are the architecture's (``_hf.HFFunctions``) on the model under
peft's wrapper (``PeftModel.get_base_model``), with names under peft's prefix, and a TP plan that
shards each adapted layer's base layer as the plan says and the adapter matrix on the same dim
(``lora_tp_plan``). ``merged_state``: the model with its adapters merged (``merge_and_unload``),
what format ``hf_export`` exports for a LoRA model.

PEFT keeps the names of ``named_parameters`` in its state dict (``...q_proj.base_layer.weight``,
``...q_proj.lora_A.default.weight``): the live state and the state dict name entries alike
(tests/test_lora.py). Its own adapter file (``get_peft_model_state_dict``, ``save_pretrained``)
drops the adapter's name (``peft_name``).

Imports peft: only for entries with ``lora`` (models._hf imports this module lazily).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from pipeline_lib.common.errors import Incompatible, one_line
from pipeline_lib.models._hf import HFFunctions, HFModelDefinition
from pipeline_lib.models._user import CAUSAL_LM_SUFFIXES, UserModel, _plan_targets

ADAPTER = "default"  # peft's adapter name when none is given
# The path from peft's wrapper (PeftModel) to the architecture's model.
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoRADefinition:
    """An ``hf_models`` entry's ``lora``: peft's LoraConfig fields under the config's names."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    dropout: float = 0.0

    @classmethod
    def from_dict(cls, data: dict) -> LoRADefinition:
        return cls(
            data["rank"], data["alpha"], tuple(data["target_modules"]), data.get("dropout", 0.0)
        )

    def peft_config(self, architecture: str) -> LoraConfig:
        causal = architecture.endswith(CAUSAL_LM_SUFFIXES)
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            target_modules=list(self.target_modules),
            lora_dropout=self.dropout,
            task_type="CAUSAL_LM" if causal else None,
        )


def adapted(definition: HFModelDefinition, model: nn.Module) -> nn.Module:
    """``model`` with the definition's LoRA adapters (peft's PeftModel; the base frozen)."""
    lora = LoRADefinition.from_dict(definition.lora)
    with warnings.catch_warnings():
        # peft asks transformers' deprecated is_gradient_checkpointing (transformers 5.24).
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
        )
        return get_peft_model(model, lora.peft_config(definition.architecture))


@dataclass(frozen=True)
class LoRAModelSource:
    """What ``models.get`` returns for an ``hf_models`` name whose entry has ``lora``."""

    name: str

    def build(self, hf: dict, base_seed: int | None = None) -> UserModel:
        """``base_seed``: the seed of the base, where it is not the job's (a loader of an
        adapter-only checkpoint builds the saver's base)."""
        return build(self.name, HFModelDefinition.from_dict(hf), base_seed)


def build(name: str, definition: HFModelDefinition, base_seed: int | None = None) -> UserModel:
    """The architecture (from ``base_seed`` when given, the job's seed otherwise), then its
    adapters (from the job's seed)."""
    if base_seed is None:
        model = definition.build()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(base_seed)
            model = definition.build()
    config = model.config
    return UserModel(name, LoRAFunctions(name, definition, config), adapted(definition, model))


def definition_error(definition: HFModelDefinition) -> str | None:
    """Why an entry's ``lora`` cannot apply, or None: ``lora.<field>: <why>`` (builds the
    architecture on the meta device and adds the adapters there)."""
    lora = LoRADefinition.from_dict(definition.lora)
    if lora.dropout != 0:
        return (
            f"lora.dropout: {lora.dropout}: only 0 (dropout draws from each rank's RNG, so "
            "layouts would train on different masks)"
        )
    with torch.device("meta"):
        model = definition.build()
    names = [n for n, _ in model.named_modules()]
    for i, target in enumerate(lora.target_modules):
        if not any(n == target or n.endswith(f".{target}") for n in names):
            return (
                f"lora.target_modules.{i}: {target!r} names no module of {definition.architecture}"
            )
    try:
        with torch.device("meta"):
            adapted(definition, model)
    except Exception as exc:  # peft's own checks: ValueError, TypeError, ...
        return "lora: " + one_line(exc)[:300]
    return None


def peft_name(entry: str) -> str:
    """A model entry's name as peft's adapter file names it (``get_peft_model_state_dict``):
    without the UserModel's ``model.user_model.`` and without the adapter's name."""
    name = entry.removeprefix("model.").removeprefix("user_model.")
    return name.replace(f".{ADAPTER}.", ".")


@dataclass(frozen=True)
class LoRAFunctions(HFFunctions):
    """The architecture's functions (HFFunctions) on the model under peft's wrapper."""

    def fsdp_units(self, model: nn.Module) -> list[nn.Module]:
        return super().fsdp_units(model.get_base_model())

    def pipeline_split(self, model: nn.Module):
        raise Incompatible(
            f"{self.name}: LoRA models are not split into pipeline stages here (configs/lora.yaml "
            "runs single, DDP, FSDP2, TP and FSDP2+TP)"
        )

    def tp_plan(self, model: nn.Module) -> dict:
        """The architecture's plan (HFFunctions.tp_plan) under peft's prefix, each key naming
        an adapted layer mapped by ``lora_tp_plan``."""
        base = model.get_base_model()
        plan = {}
        for key, style in super().tp_plan(base).items():
            targets = [m for _, m in _plan_targets(base, key)]
            adapted_targets = [m for m in targets if isinstance(m, LoraLayer)]
            if not adapted_targets:
                plan[PEFT_PREFIX + key] = style
            elif len(adapted_targets) < len(targets):
                raise Incompatible(f"{self.name}: TP plan key {key} names adapted and plain layers")
            else:
                plan.update(lora_tp_plan(PEFT_PREFIX + key, style, self.name))
        return plan

    def merged_state(self, state: dict, dtype: torch.dtype) -> dict:
        """The architecture's state with the adapters merged: ``state`` (the LoRA model's full
        state, names under peft's wrapper) loaded into the LoRA model built afresh on the CPU,
        then peft's ``merge_and_unload``, as a user exports a fine-tuned model."""
        with torch.random.fork_rng(devices=[]):
            model = adapted(self.definition, self.definition.build()).to(dtype)
        model.load_state_dict(state)
        return model.merge_and_unload().state_dict()


def lora_tp_plan(key: str, style, name: str) -> dict:
    """The plan of a LoRA-adapted linear layer (``base_layer``, ``lora_A``, ``lora_B``) whose
    base plan is ``style``: the base layer as the style says, and the adapter on the same dim.
    Colwise (output dim sharded): ``lora_B`` (rank -> out) colwise too, ``lora_A`` whole (its
    output, the rank dim, replicated). Rowwise (input dim sharded): ``lora_A`` (in -> rank)
    rowwise too (its output all-reduced), ``lora_B`` whole on the replicated result. The sum of
    the base and the adapter's outputs is then in one layout on every rank."""
    if isinstance(style, ColwiseParallel):
        sharded = "lora_B"
    elif isinstance(style, RowwiseParallel):
        sharded = "lora_A"
    else:
        raise Incompatible(f"{name}: TP style {type(style).__name__} of {key} on a LoRA layer")
    return {f"{key}.base_layer": style, f"{key}.{sharded}.{ADAPTER}": style}
