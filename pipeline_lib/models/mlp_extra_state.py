"""mlp_extra_state: the mlp behind an input scale whose state travels only through torch's
extra-state protocol (``get_extra_state`` / ``set_extra_state``), not as a parameter or buffer.

The extra state is a dict of tensors: ``scale`` (drawn from the init seed, so the loader's
different init differs) and ``forwards`` (training forwards so far, so training changes it). A
loader that skips ``set_extra_state`` keeps its own values and fails the bit-for-bit check.

Why a dict of tensors: DCP flattens it into one tensor entry per key
(``model.input_scale._extra_state.scale``), so each is saved, compared bit for bit and loaded
like a buffer; a plain tensor also round-trips (tried under single, DDP, FSDP1, FSDP2 and TP on
torch 2.13), a non-tensor value would be pickled. ``get_extra_state`` returns copies, so only
``set_extra_state`` can restore the module (``dcp.load`` cannot write into it in place).

The scale is a direct child of the root, never an FSDP unit itself: on torch 2.13,
``get_state_dict`` fails on the extra state of a module that FSDP1 wraps as a unit
(``AttributeError: ... has no attribute '_extra_state'`` in ``_get_fqns``).
"""

import torch
from torch import nn

from pipeline_lib.models.mlp import DIMS, MLP


class InputScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        # Non-persistent buffers: they follow .to(device), and only the extra state saves them.
        self.register_buffer("scale", 1.0 + 0.1 * torch.randn(dim), persistent=False)
        self.register_buffer("forwards", torch.zeros((), dtype=torch.int64), persistent=False)

    def forward(self, x):
        if self.training:
            self.forwards += 1
        return x * self.scale

    def get_extra_state(self) -> dict[str, torch.Tensor]:
        return {"scale": self.scale.clone(), "forwards": self.forwards.clone()}

    def set_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.scale.copy_(state["scale"])
        self.forwards.copy_(state["forwards"])


class MLPExtraState(MLP):
    def __init__(self, dim: int, hidden: int, out: int, blocks: int = 2):
        super().__init__(dim, hidden, out, blocks)
        self.input_scale = InputScale(dim)

    def forward(self, x):
        return super().forward(self.input_scale(x))


def build(**dims) -> MLPExtraState:
    return MLPExtraState(**{**DIMS, **dims})
