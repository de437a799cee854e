"""mlp_object_state: the mlp with two modules whose state is not a tensor and travels only
through torch's extra-state protocol (``get_extra_state`` / ``set_extra_state``), as torch's
own ``test_extra_state`` (a string) and users' modules (a dict of settings and counters) keep it.

- ``input_note`` returns a string, ``"<label>/<forwards>"``: one entry
  ``model.input_note._extra_state``, which DCP pickles as bytes.
- ``output_note`` returns a dict of plain Python values (a string, an int, a list of ints):
  DCP flattens it into one entry per key (``model.output_note._extra_state.forwards``), each
  pickled.

The label is drawn from the init seed (the loader's different init draws another) and
``forwards`` counts training forwards, so a loader that skips ``set_extra_state`` keeps values
that differ from the saver's and fails the bit-for-bit check by value. Both are direct children
of the root, never an FSDP unit themselves (``mlp_extra_state`` says why).
"""

import torch
from torch import nn

from pipeline_lib.models.mlp import DIMS, MLP


def _label() -> str:
    return f"init-{int(torch.randint(0, 2**31 - 1, ()))}"


class TextNote(nn.Module):
    """Identity whose extra state is a string."""

    def __init__(self):
        super().__init__()
        self.label, self.forwards = _label(), 0

    def forward(self, x):
        self.forwards += int(self.training)
        return x

    def get_extra_state(self) -> str:
        return f"{self.label}/{self.forwards}"

    def set_extra_state(self, state: str) -> None:
        self.label, _, forwards = state.rpartition("/")
        self.forwards = int(forwards)


class DictNote(nn.Module):
    """Identity whose extra state is a dict of plain values (no tensor)."""

    def __init__(self, out: int):
        super().__init__()
        self.label, self.forwards, self.sample_shape = _label(), 0, [out]

    def forward(self, x):
        if self.training:
            self.forwards += 1
            self.sample_shape = list(x.shape[1:])  # the same on every rank and layout
        return x

    def get_extra_state(self) -> dict:
        shape = list(self.sample_shape)
        return {"label": self.label, "forwards": self.forwards, "sample_shape": shape}

    def set_extra_state(self, state: dict) -> None:
        self.label, self.forwards = state["label"], int(state["forwards"])
        self.sample_shape = list(state["sample_shape"])


class MLPObjectState(MLP):
    def __init__(self, dim: int, hidden: int, out: int, blocks: int = 2):
        super().__init__(dim, hidden, out, blocks)
        self.input_note = TextNote()
        self.output_note = DictNote(out)

    def forward(self, x):
        return self.output_note(super().forward(self.input_note(x)))


def build(**dims) -> MLPObjectState:
    return MLPObjectState(**{**DIMS, **dims})
