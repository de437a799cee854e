"""Models, one module each, registered by module name; or your own, named by import path
(``package.module:callable``, adapted by ``_user``), or a Hugging Face architecture named in the
config's ``hf_models`` (built by ``_hf``), or a torchtitan model named in its ``torchtitan_models``
(built by ``_torchtitan``).

A model module defines ``build() -> torch.nn.Module``; the module it returns provides:
- ``forward(inputs)``;
- ``make_batch(step, global_batch, seed) -> (inputs, targets)``: the seeded global batch of a step
  (identical for every layout; each data-parallel rank takes its slice);
- ``loss_sum(outputs, targets) -> (summed loss, number of loss terms)``;
- ``fsdp_units()``: the blocks FSDP wraps or shards one by one (the root is always added);
- ``tp_plan()``: ``parallelize_module`` plan; ``tp_dims()``: {dim name: size} that the TP degree
  must divide because the model's own arithmetic needs whole parts on each TP rank (attention
  heads); a layout that does not divide one becomes a ``skip`` cell. Any other size the plan
  shards is torch's to shard unevenly: the cell runs and torch's error, if any, is its verdict;
- optional ``ep_plan()``: {experts module name: ParallelStyle} for expert parallelism
  (models._expert_parallel); ``load_balance(sum_over_ranks)``: router state updated before
  each optimizer step (models.moe).
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

from pipeline_lib.common.registry import load_module, module_names

if TYPE_CHECKING:
    from pipeline_lib.models._user import UserModelSource


# ItemSpec.model_kwargs key holding an ``hf_models`` entry (grid -> worker; models._hf).
HF_KEY = "hf"
# ItemSpec.model_kwargs key holding a ``torchtitan_models`` entry (models._torchtitan).
TITAN_KEY = "torchtitan"


class UserModelError(ValueError):
    """An import-path model cannot be used; the message says why."""


def names() -> list[str]:
    """The built-in models."""
    return module_names(__name__)


def spec_kwargs(config: dict, name: str) -> dict:
    """What a job's item spec adds for model ``name``: its ``hf_models`` or
    ``torchtitan_models`` entry, if any."""
    entry = config.get("hf_models", {}).get(name)
    if entry is not None:
        return {"model_kwargs": {HF_KEY: entry}}
    entry = config.get("torchtitan_models", {}).get(name)
    return {"model_kwargs": {TITAN_KEY: entry}} if entry is not None else {}


def is_import_path(name: str) -> bool:
    return ":" in name


def get(name: str, model_kwargs: dict | None = None) -> ModuleType | UserModelSource:
    """The model's module, or for an import path its UserModelSource, or for an ``hf_models``
    name (``model_kwargs`` holds its entry under HF_KEY) its HFModelSource: all have
    ``build(**model_kwargs)``. An unusable import path raises UserModelError."""
    if model_kwargs and HF_KEY in model_kwargs and model_kwargs[HF_KEY].get("lora"):
        from pipeline_lib.models import _lora  # imports peft: only for LoRA models

        return _lora.LoRAModelSource(name)
    if model_kwargs and HF_KEY in model_kwargs:
        from pipeline_lib.models import _hf  # imports transformers: only for those models

        return _hf.HFModelSource(name)
    if model_kwargs and TITAN_KEY in model_kwargs:
        from pipeline_lib.models import _torchtitan  # imports torchtitan: only for its models

        return _torchtitan.TitanModelSource(name)
    if is_import_path(name):
        from pipeline_lib.models import _user  # imports torch: only for your own model

        return _user.load(name)
    return load_module(__name__, name)
