"""mlp_renamed: the mlp whose state-dict keys differ from its parameter names, as a PEFT model's
do: each block's Linear layers sit in a wrapper as its ``base_layer`` (parameters
``blocks.<i>.fc<j>.base_layer.weight``), and the wrapper's state-dict post hook saves them
under the names the plain mlp has (``blocks.<i>.fc<j>.weight``); its load-state-dict pre hook
maps them back. The wrapper exposes ``weight`` and ``bias`` as PEFT's layers do (torch's
get_state_dict looks a key's names up as attributes). Public hooks only
(``register_state_dict_post_hook``, ``register_load_state_dict_pre_hook``).

Exercises the live state's naming (pipeline_lib.verify.live.Anatomy): a checkpoint entry is
named by its state-dict key, its value is the parameter the key's value is.
``build(lossy_load=True)``: the load hook drops the mapping (a
mapping lost without an error: a strict load still sees every key it wants) and resets the
layer; its cells must fail naming the renamed entries (tests/test_legacy.py)."""

import torch
from torch import nn

from pipeline_lib.models import mlp

NAMES = ("weight", "bias")  # a wrapped Linear's parameters, saved without "base_layer."


class Wrapped(nn.Module):
    """A Linear as ``base_layer``, its state saved and loaded under the Linear's own names."""

    def __init__(self, base_layer: nn.Linear, lossy_load: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.register_state_dict_post_hook(_rename_on_save)
        self.register_load_state_dict_pre_hook(_lose_on_load if lossy_load else _rename_on_load)

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def forward(self, x):
        return self.base_layer(x)


def _rename_on_save(module, state_dict, prefix, local_metadata) -> None:
    for name in NAMES:
        state_dict[prefix + name] = state_dict.pop(f"{prefix}base_layer.{name}")


def _rename_on_load(module, state_dict, prefix, *_args) -> None:
    for name in NAMES:
        if prefix + name in state_dict:
            state_dict[f"{prefix}base_layer.{name}"] = state_dict.pop(prefix + name)


def _lose_on_load(module, state_dict, prefix, *_args) -> None:
    # The renamed entry dropped, the layer reset in its place (DCP loads in place into the
    # parameters a state dict shares with the model: keeping the layer's own values would keep
    # what dcp.load wrote).
    for name in NAMES:
        if state_dict.pop(prefix + name, None) is not None:
            own = getattr(module.base_layer, name)
            state_dict[f"{prefix}base_layer.{name}"] = torch.zeros_like(own.detach())


class RenamedMLP(mlp.MLP):
    def tp_plan(self):  # the Linear layers are the wrappers' base_layer
        return {f"{key}.base_layer": style for key, style in super().tp_plan().items()}


def build(lossy_load: bool = False, **dims) -> RenamedMLP:
    model = RenamedMLP(**{**mlp.DIMS, **dims})
    for block in model.blocks:
        block.fc1 = Wrapped(block.fc1, lossy_load)
        block.fc2 = Wrapped(block.fc2, lossy_load)
    return model
