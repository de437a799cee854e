"""How an existing checkpoint's entry names map to the entries dcp-matrix names (docs: glossary,
"naming"). Pure (no torch).

A naming is one function ``ours(entry) -> str | None`` from a checkpoint entry to the model's
own name of it: ``model.<fqn>``, ``optim.state.<fqn>.<key>``, ``optim.param_groups.<i|fqn>.<key>``,
``scheduler.<key>`` (or ``scheduler``: the LR scheduler's state as one object entry), where
``<fqn>`` names a parameter or buffer as the model its builder returns does; or None for an
entry the load leaves out on purpose (a data loader's or a trainer's own state). An entry that
is neither is one the load cannot place: it is reported by name and fails the cell. Built in:

- ``dcp_matrix``: this tool's own save jobs (the identity);
- ``torchtitan``: torchtitan's CheckpointManager: the model's FQNs at the top level,
  ``optimizer.…`` (flattened: ``optimizer.state.<fqn>.exp_avg``,
  ``optimizer.param_groups.<fqn>.lr``), ``lr_scheduler.…`` or ``lr_scheduler`` (one object
  entry, as DCP up to torch 2.3 wrote a dict holding no tensor); ``dataloader…`` and
  ``train_state…`` left out;
- ``huggingface``: a Hugging Face ``save_pretrained`` folder (model weights only, under the
  model's own names): every entry is ``model.<entry>`` (``huggingface_model``).

Or a function of yours, named by import path ``package.module:function``.

``place`` then names each entry as this tool does: a model of yours or an ``hf_models`` one runs
inside a wrapper whose FQNs start with ``user_model.`` (models._user.UserModel), so every
parameter name in an entry gets it, the model's, the optimizer state's and the per-parameter
param groups' alike, and so do the parameter names a param group by index lists (its
``params``: ``EntryMap.value``). Names that carry the wrapper already (this tool's own
checkpoints of such a model) are taken as they are.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache

Ours = Callable[[str], "str | None"]

# What a naming function of yours must be (its signature): ours(entry) -> str | None.
_ONE_PARAMETER = "a naming takes exactly one positional parameter, the entry name"
# Entries of torchtitan checkpoints that are not model, optimizer or LR scheduler state.
TORCHTITAN_EXCLUDED = ("dataloader", "train_state")
# torchtitan's top-level keys -> ours.
TORCHTITAN_KEYS = {"optimizer": "optim", "lr_scheduler": "scheduler"}
# What torchtitan's LRSchedulersContainer saves of its schedulers' state (its state_dict, 0.3.0):
# each scheduler's lr is recomputed from its optimizer's base_lrs on load.
TORCHTITAN_SCHEDULER = ("last_epoch",)
MODEL, STATE, GROUPS, SCHEDULER = "model.", "optim.state.", "optim.param_groups.", "scheduler"
# The naming of a Hugging Face save_pretrained folder (the default of format hf_safetensors).
HUGGINGFACE = "huggingface"


class NamingError(ValueError):
    """A naming that cannot be used; the message says why."""


@dataclass(frozen=True)
class Naming:
    """A naming: ``dcp_matrix``, ``torchtitan``, ``huggingface`` or ``package.module:function``."""

    name: str

    def ours(self, entry: str) -> str | None:
        """The model's own name of a checkpoint entry (None: left out on purpose)."""
        if self.name == "dcp_matrix":
            return entry
        if self.name == "torchtitan":
            return _torchtitan(entry)
        if self.name == HUGGINGFACE:
            return huggingface_model(entry)
        return _user_function(self.name)(entry)


def huggingface_model(entry: str) -> str:
    """A Hugging Face folder's tensor: a parameter or buffer under the model's own name (a
    transformers model's ``state_dict`` keys, as ``save_pretrained`` writes them)."""
    return MODEL + entry


def _torchtitan(entry: str) -> str | None:
    head, dot, rest = entry.partition(".")
    if head in TORCHTITAN_EXCLUDED:
        return None
    if head in TORCHTITAN_KEYS:
        return TORCHTITAN_KEYS[head] + dot + rest
    return MODEL + entry


@cache
def _user_function(name: str) -> Ours:
    """Your naming function, imported (which runs its module) and checked before its first call: a
    plain Python function of one positional parameter, defined in a module of your own
    (pipeline_lib.common.registry: never a built-in, a class or a function of the standard library
    or of an installed package, which the entry names of a checkpoint from elsewhere would reach).
    """
    import inspect

    from pipeline_lib.common.registry import import_path

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
    None. Runs nothing: your module is found and its source read (pipeline_lib.common.registry), not
    imported; a job imports it (``_user_function`` checks it again, on what the import made)."""
    from pipeline_lib.common.registry import locate, top_level_function

    if name in ("dcp_matrix", "torchtitan", HUGGINGFACE):
        return None
    if ":" not in name:
        return (
            f"unknown naming {name!r} (dcp_matrix, torchtitan, {HUGGINGFACE}, or "
            "package.module:function)"
        )
    try:
        definition = top_level_function(locate(name, NamingError), NamingError)
    except NamingError as exc:
        return str(exc)
    args = definition.args
    if args.vararg or args.kwarg or args.kwonlyargs or len(args.posonlyargs + args.args) != 1:
        return f"{name} takes ({ast.unparse(args)}): {_ONE_PARAMETER}"
    return None


@dataclass(frozen=True)
class EntryMap:
    """Where a checkpoint's entries go: ``ours`` (checkpoint entry -> our entry), the entries
    left out on purpose, those the load cannot place; for the parameter names a param group
    lists (``value``): ``params`` (a name the checkpoint may list -> ours) and ``prefix``
    (what our names put before the checkpoint's parameter names)."""

    ours: dict[str, str]
    excluded: tuple[str, ...]
    unplaced: tuple[str, ...]
    params: dict[str, str] = field(default_factory=dict)
    prefix: str = ""

    @property
    def model_only(self) -> bool:
        """Every entry placed is a model entry: a checkpoint of weights only (a Hugging Face
        folder), whose load starts the resume with a fresh optimizer."""
        return bool(self.ours) and all(n.startswith(MODEL) for n in self.ours.values())

    @property
    def flattened_optim(self) -> bool:
        """The optimizer's param_groups are keyed by parameter (flatten_optimizer_state_dict)."""
        return any(parts[0] == GROUPS for n in self.ours.values() if (parts := split_fqn(n)))

    def value(self, ours: str, value):
        """A checkpoint entry's value under our name ``ours``: the parameter names a param
        group by index lists (``optim.param_groups.<i>.params``) as ours, others as they are."""
        if not (is_group_params(ours) and isinstance(value, list)):
            return value
        return [self.param(name) if isinstance(name, str) else name for name in value]

    def param(self, name: str) -> str:
        """Our name of a parameter the checkpoint's param group lists: as the checkpoint's
        optimizer state entries of it map (``listed``); one without state, as the checkpoint's
        parameter names map (``prefix``)."""
        return self.params.get(name, self.prefix + name)


def partial_scheduler(naming: str, saved: Iterable[str]) -> bool:
    """The checkpoint's LR scheduler state (``saved``: its entries as ours) is exactly what
    torchtitan saves of it (TORCHTITAN_SCHEDULER), under the ``torchtitan`` naming."""
    kept = {f"{SCHEDULER}.{key}" for key in TORCHTITAN_SCHEDULER}
    return naming == "torchtitan" and {n for n in saved if n.startswith(SCHEDULER + ".")} == kept


def uncompared(naming: str, saved: Iterable[str], loader: Iterable[str]) -> list[str]:
    """The loader's entries that have no counterpart in a checkpoint by its writer's design,
    so they are not compared: with a ``partial_scheduler``, the loader's ``scheduler.<key>``
    entries other than those torchtitan saves (``base_lrs``, ``_last_lr``, ...). Every entry
    the checkpoint holds is still compared."""
    if not partial_scheduler(naming, saved):
        return []
    kept = {f"{SCHEDULER}.{key}" for key in TORCHTITAN_SCHEDULER}
    return sorted(n for n in loader if n.startswith(SCHEDULER + ".") and n not in kept)


def split_fqn(name: str) -> tuple[str, str, str] | None:
    """(head, parameter or buffer name, tail) of an entry that names one: ``model.<fqn>``,
    ``optim.state.<fqn>.<key>``, ``optim.param_groups.<fqn>.<key>`` (a param group keyed by
    parameter: not a group index); None for any other."""
    if name.startswith(MODEL):
        return MODEL, name[len(MODEL) :], ""
    for head in (STATE, GROUPS):
        if name.startswith(head):
            fqn, dot, key = name[len(head) :].rpartition(".")
            if fqn and not (head == GROUPS and fqn.isdigit()):
                return head, fqn, dot + key
    return None


def is_group_params(name: str) -> bool:
    """The parameter names of a param group by index: ``optim.param_groups.<i>.params``."""
    index, _, key = name.removeprefix(GROUPS).partition(".")
    return name.startswith(GROUPS) and index.isdigit() and key == "params"


def place(
    entries: Iterable[str], naming: Naming, known: set[str] | None = None, wrapper: str = ""
) -> EntryMap:
    """Where each checkpoint entry goes; ``known`` (optional): the model's entries as this tool
    names them (``model.…``), so that a model entry the model lacks is unplaced; ``wrapper``:
    what this tool puts before the model's own parameter names (``user_model.``), unless the
    checkpoint's names carry it already."""
    names = {entry: naming.ours(entry) for entry in sorted(entries)}
    prefix = _prefix(names.values(), known, wrapper)
    ours, excluded, unplaced = {}, [], []
    for entry, name in names.items():
        mine = None if name is None else prefixed(name, prefix)
        if mine is None:
            excluded.append(entry)
        elif _placeable(mine, known):
            ours[entry] = mine
        else:
            unplaced.append(entry)
    return EntryMap(ours, tuple(excluded), tuple(unplaced), listed(ours), prefix)


def listed(ours: dict[str, str]) -> dict[str, str]:
    """The names a param group of the checkpoint may list a parameter by -> our name of it:
    each dotted tail of the name of the parameter's optimizer state entries (``<stem>.<key>``,
    a param group listing the parameter by the stem or a tail of it), the shortest stem where
    tails of several are equal (all stems share the optimizer's own prefix)."""
    stems = {entry.rpartition(".")[0]: split_fqn(mine)[1] for entry, mine in ours.items()
             if mine.startswith(STATE)}  # fmt: skip
    found: dict[str, str] = {}
    for stem in sorted(stems, key=len, reverse=True):  # the shortest stem last: it wins
        parts = stem.split(".")
        found.update({".".join(parts[i:]): stems[stem] for i in range(len(parts))})
    return found


def prefixed(name: str, prefix: str) -> str:
    """``name`` with ``prefix`` before the parameter or buffer name it holds, if any."""
    parts = split_fqn(name)
    return name if parts is None or not prefix else parts[0] + prefix + parts[1] + parts[2]


def _prefix(names: Iterable[str | None], known: set[str] | None, wrapper: str) -> str:
    """``wrapper``, unless the names' model entries place as they are more often than with
    it (a checkpoint of this tool's own, whose names carry the wrapper)."""
    model = [n for n in names if n is not None and n.startswith(MODEL)]
    if not wrapper or known is None:
        return wrapper
    as_they_are = sum(n in known for n in model)
    return "" if as_they_are > sum(prefixed(n, wrapper) in known for n in model) else wrapper


def _placeable(mine: str, known: set[str] | None) -> bool:
    if mine.startswith(MODEL):
        return known is None or mine in known
    return mine == SCHEDULER or mine.startswith(("optim.", SCHEDULER + "."))
