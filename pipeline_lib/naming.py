"""How an existing checkpoint's entry names map to the entries dcp-matrix names (docs: glossary,
"naming"). Pure (no torch).

A naming is one function ``ours(entry) -> str | None`` from a checkpoint entry to this tool's
name of it (``model.<fqn>``, ``optim.state.<fqn>.<key>``, ``optim.param_groups.…``,
``scheduler.<key>``), or None for an entry the load leaves out on purpose (a data loader's or
a trainer's own state). An entry that is neither is one the load cannot place: it is reported by
name and fails the cell. Built in:

- ``dcp_matrix``: this tool's own save jobs (the identity);
- ``torchtitan``: torchtitan's CheckpointManager: the model's FQNs at the top level,
  ``optimizer.…`` (flattened: ``optimizer.state.<fqn>.exp_avg``,
  ``optimizer.param_groups.<fqn>.lr``), ``lr_scheduler.…``; ``dataloader.…`` and
  ``train_state.…`` left out.

Or a function of yours, named by import path ``package.module:function``.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

Ours = Callable[[str], "str | None"]

# What a naming function of yours must be (its signature): ours(entry) -> str | None.
_ONE_PARAMETER = "a naming takes exactly one positional parameter, the entry name"
# Entries of torchtitan checkpoints that are not model, optimizer or LR scheduler state.
TORCHTITAN_EXCLUDED = ("dataloader", "train_state")


class NamingError(ValueError):
    """A naming that cannot be used; the message says why."""


@dataclass(frozen=True)
class Naming:
    """A naming for a model whose state entries start with ``model_prefix`` (``model.``, or
    ``model.user_model.`` for a model named by import path)."""

    name: str
    model_prefix: str = "model."

    def ours(self, entry: str) -> str | None:
        if self.name == "dcp_matrix":
            return entry
        if self.name == "torchtitan":
            return _torchtitan(entry, self.model_prefix)
        return _user_function(self.name)(entry)


def _torchtitan(entry: str, model_prefix: str) -> str | None:
    head, _, rest = entry.partition(".")
    if head in TORCHTITAN_EXCLUDED:
        return None
    if head == "optimizer":
        return f"optim.{rest}"
    if head == "lr_scheduler":
        return f"scheduler.{rest}"
    return model_prefix + entry


@cache
def _user_function(name: str) -> Ours:
    """Your naming function, imported (which runs its module) and checked before its first call:
    a plain Python function of one positional parameter, defined in a module of your own
    (pipeline_lib.registry: never a built-in, a class or a function of the standard library or
    of an installed package, which the entry names of a checkpoint from elsewhere would reach)."""
    import inspect

    from pipeline_lib.registry import import_path

    function = import_path(name, NamingError)[1]
    if inspect.isgeneratorfunction(function) or inspect.iscoroutinefunction(function):
        raise NamingError(f"{name} is a generator or coroutine function, not ours(entry)")
    if why := _signature_error(inspect.signature(function).parameters.values()):
        raise NamingError(f"{name} {why}")
    return function


def _signature_error(parameters) -> str | None:
    """Why a function with these ``inspect`` parameters is not ``ours(entry)``, or None."""
    positional = ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD")
    kinds = [p.kind.name for p in parameters]
    if len(kinds) != 1 or kinds[0] not in positional:
        shown = ", ".join(str(p) for p in parameters)
        return f"takes ({shown}): {_ONE_PARAMETER}"
    return None


def naming_error(name: str) -> str | None:
    """Why ``name`` is not a naming (built-in, or ``package.module:function`` of your own), or
    None. Runs nothing: your module is found and its source read (pipeline_lib.registry), not
    imported; a job imports it (``_user_function`` checks it again, on what the import made)."""
    from pipeline_lib.registry import locate, top_level_function

    if name in ("dcp_matrix", "torchtitan"):
        return None
    if ":" not in name:
        return f"unknown naming {name!r} (dcp_matrix, torchtitan, or package.module:function)"
    try:
        definition = top_level_function(locate(name, NamingError), NamingError)
    except NamingError as exc:
        return str(exc)
    args = definition.args
    if args.vararg or args.kwarg or args.kwonlyargs or len(args.posonlyargs + args.args) != 1:
        return f"{name} takes ({ast.unparse(args)}): {_ONE_PARAMETER}"
    return None


@dataclass(frozen=True)
class Placement:
    """Where a checkpoint's entries go: ``ours`` (checkpoint entry -> our entry), the entries
    left out on purpose, and those the load cannot place."""

    ours: dict[str, str]
    excluded: tuple[str, ...]
    unplaced: tuple[str, ...]

    @property
    def flattened_optim(self) -> bool:
        """The optimizer's param_groups are keyed by parameter (flatten_optimizer_state_dict)."""
        return any(
            n.startswith("optim.param_groups.") and not n.split(".")[2].isdigit()
            for n in self.ours.values()
        )


def place(entries: list[str], naming: Naming, known: set[str] | None = None) -> Placement:
    """Where each checkpoint entry goes; ``known`` (optional): the model's own entries
    (``model.…``), so that a model entry the model lacks is unplaced."""
    ours, excluded, unplaced = {}, [], []
    for entry in sorted(entries):
        mine = naming.ours(entry)
        if mine is None:
            excluded.append(entry)
        elif _placeable(mine, known):
            ours[entry] = mine
        else:
            unplaced.append(entry)
    return Placement(ours, tuple(excluded), tuple(unplaced))


def _placeable(mine: str, known: set[str] | None) -> bool:
    if mine.startswith("model."):
        return known is None or mine in known
    return mine.startswith(("optim.", "scheduler."))
