"""What happened before the save (the ``history`` axis), on the saver and, rebuilt, on the loader.

- ``plain``: every parameter trains from the first step to the save.
- ``frozen_midway``: the parameters of the model's first module (``chosen``) train for the first
  ``midway_step`` steps, then are frozen (``requires_grad_(False)``) and stay in the optimizer,
  with the state they had, while the rest trains on to the save.
- ``group_added_midway``: those parameters are frozen at the start and left out of the optimizer;
  at ``midway_step`` they are unfrozen and added as a param group (``add_param_group``, the
  optimizer's defaults), and everything trains on to the save.

The loader is built as a user resuming builds it: the same model, frozen where the saver's was at
its save, and the same param groups, before the load (``as_at_save``). Nothing here touches the
state a load gives: what torch's state-dict API does with that history is the cell's verdict.
Imports torch only through the objects it is handed.
"""

from __future__ import annotations

from pipeline_lib.common.errors import Incompatible

PLAIN = "plain"
FROZEN_MIDWAY = "frozen_midway"
GROUP_ADDED_MIDWAY = "group_added_midway"


def midway_step(train: dict) -> int:
    """The step before which the history's change happens: half of train.steps."""
    return train["steps"] // 2


def chosen(base) -> list:
    """The parameters the history freezes or adds: those of the module that holds the model's
    first parameter (every model has one; an embedding, a first linear layer)."""
    named = list(base.named_parameters())
    module = named[0][0].rpartition(".")[0]
    return [param for name, param in named if name.rpartition(".")[0] == module]


def check(history: str, framework, train: dict, frozen: frozenset, pipeline: bool) -> None:
    """Incompatible (a skip) where the history cannot happen under this layout or model."""
    if history == PLAIN:
        return
    if midway_step(train) < 1:
        raise Incompatible(f"history {history}: train.steps {train['steps']} has no midway (< 2)")
    if framework.flat_members is not None:
        raise Incompatible(
            f"history {history}: under {framework.name} a unit's parameters are one "
            "FlatParameter, whose subset cannot be frozen on its own"
        )
    if pipeline:
        raise Incompatible(
            f"history {history}: not run under pipeline parallelism (a stage may not hold the "
            "model's first module)"
        )
    if frozen:
        raise Incompatible(
            f"history {history}: the model has frozen parameters of its own (the frozen_params "
            "axis is their history)"
        )
    if framework.name == "ddp":
        raise Incompatible(f"history {history}: {_DDP[history]}")


# Why DDP cannot take a history (it fixes the parameters it reduces when it is built; a user
# changing them wraps the model again, or passes find_unused_parameters=True).
_DDP = {
    FROZEN_MIDWAY: "DDP expects a gradient of every parameter that required grad when it was "
    "built; one frozen later leaves its reduction unfinished (DDP's documented error at the "
    "next step: 'Expected to have finished reduction in the prior iteration')",
    GROUP_ADDED_MIDWAY: "DDP reduces only the parameters that required grad when it was built; "
    "one unfrozen later would not be averaged (the ranks would diverge)",
}


def at_start(history: str, base) -> None:
    """Before the optimizer is built: group_added_midway freezes the chosen parameters (the
    optimizer recipes take only trainable ones)."""
    if history == GROUP_ADDED_MIDWAY:
        for param in chosen(base):
            param.requires_grad_(False)


def at_midway(history: str, base, optimizer) -> None:
    """The change at ``midway_step``: freeze the chosen parameters (they stay in the optimizer),
    or unfreeze them and add them to the optimizer as a new param group."""
    if history == FROZEN_MIDWAY:
        for param in chosen(base):
            param.requires_grad_(False)
    elif history == GROUP_ADDED_MIDWAY:
        params = chosen(base)
        for param in params:
            param.requires_grad_(True)
        optimizer.add_param_group({"params": params})


def as_at_save(history: str, base, optimizer) -> None:
    """The loader, built as the saver was at the start, brought to the saver's parameters and
    param groups at its save (before the load, as a user resuming does)."""
    at_midway(history, base, optimizer)
