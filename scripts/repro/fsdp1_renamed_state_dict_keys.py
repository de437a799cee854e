"""Reproducer (torch only): FSDP1 refuses a model whose state-dict keys differ from its
parameter names through module hooks, as a PEFT layer's do.

A wrapper holds a Linear as ``base_layer`` (parameter ``fc.base_layer.weight``); its
``register_state_dict_post_hook`` saves the Linear's state under ``fc.weight`` and its
``register_load_state_dict_pre_hook`` maps it back, which ``nn.Module.state_dict`` /
``load_state_dict``, DDP and FSDP2 (``fully_shard``) with ``get_state_dict`` accept. Under FSDP1
(``FullyShardedDataParallel``, ``use_orig_params=True``, with or without a device mesh) every
state dict (``get_state_dict``, and ``FSDP.state_dict_type(SHARDED_STATE_DICT)``) fails:
FSDP1's own state-dict post hook looks each parameter up by its name and finds the renamed key
(``AssertionError: FSDP assumes fc.base_layer.weight is in the state_dict ...``). dcp-matrix:
every cell of the built-in ``mlp_renamed`` saved or loaded under ``fsdp1_2`` or
``fsdp1_no_mesh_2`` is ``error`` (configs/legacy.yaml).

Run from anywhere (CPU, gloo; torch 2.13.0+cpu):
    torchrun --nproc-per-node 2 scripts/repro/fsdp1_renamed_state_dict_keys.py
Prints BUG and exits 1 where FSDP1's state dict refuses the renamed keys (each way of asking
for it); OK and 0 where it gives them.
"""

import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import StateDictType


class Wrapped(nn.Module):
    """A Linear as ``base_layer``, saved and loaded under the Linear's own names."""

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.register_state_dict_post_hook(self.rename_on_save)
        self.register_load_state_dict_pre_hook(self.rename_on_load)

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    @staticmethod
    def rename_on_save(module, state_dict, prefix, local_metadata):
        for name in ("weight", "bias"):
            state_dict[prefix + name] = state_dict.pop(f"{prefix}base_layer.{name}")

    @staticmethod
    def rename_on_load(module, state_dict, prefix, *_):
        for name in ("weight", "bias"):
            if prefix + name in state_dict:
                state_dict[f"{prefix}base_layer.{name}"] = state_dict.pop(prefix + name)

    def forward(self, x):
        return self.base_layer(x)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = Wrapped(nn.Linear(8, 8))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.fc(x))


def main() -> int:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    plain = Model()
    keys = sorted(plain.state_dict())
    plain.load_state_dict(plain.state_dict())  # the hooks map both ways
    failures = []
    for way in ("get_state_dict", "SHARDED_STATE_DICT"):
        model = FSDP(Model(), device_id=torch.device("cpu"), use_orig_params=True)
        optim = torch.optim.Adam(model.parameters())
        model(torch.randn(2, 8)).sum().backward()
        optim.step()
        try:
            if way == "get_state_dict":
                get_state_dict(model, optim)
            else:
                with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
                    model.state_dict()
        except AssertionError as exc:
            failures.append(f"{way}: {str(exc).splitlines()[0][:120]}")
    if dist.get_rank() == 0:
        print(f"torch {torch.__version__}; unwrapped model's keys: {keys}")
        for failure in failures:
            print(f"BUG: {failure}")
        if not failures:
            print("OK: FSDP1's state dict gives the renamed keys")
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
