"""Save sequences (axis ``save_sequence``): a saver that saves more than once in one run.

The saver trains ``train.steps`` steps and saves, trains ``train.resume_steps`` more and saves
again, with one checkpointer object for both saves (pipeline_lib.job.sequence_saver), each
checkpoint into a folder of its own, then trains ``resume_steps`` more. Every checkpoint is
checked against the saver's reference taken at its own step (checks 0 and 1 at that step), and
two consecutive checkpoints must differ in every entry the saver's live state changed between
their steps. The cells of ``load_last`` load the last checkpoint of the sequence, those of
``load_first`` the first; the column ``save_step`` says which step a cell loaded, and the
loader resumes from that step (its losses are compared with the saver's after that save).

Pure (no torch): the steps, the folders, the loader's item, and the verdict of the
consecutive-checkpoints check from the facts the save job gathered.
"""

from __future__ import annotations

from typing import Any

from pipeline_lib.plan.axes import Variant
from pipeline_lib.plan.specs import CheckpointPaths
from pipeline_lib.verify.results import CheckResult, EntryComparison

# The saves of a sequence (the first and the last; more would check nothing new here).
LENGTH = 2
# The check of two consecutive checkpoints of a sequence, as the reason names it.
CONSECUTIVE = "save sequence"


def save_steps(train: dict) -> list[int]:
    """The training steps at which the saver of a sequence saves: after ``steps`` steps, then
    every ``resume_steps`` steps."""
    return [train["steps"] + i * train["resume_steps"] for i in range(LENGTH)]


def loaded_step(variant: Variant, train: dict) -> int:
    """The step of the checkpoint the cells of ``variant`` load (one save: ``train.steps``)."""
    steps = save_steps(train)
    return steps[-1] if variant.save_sequence == "load_last" else steps[0]


def paths_by_step(variant: Variant, paths: CheckpointPaths, train: dict) -> dict[int, Any]:
    """Every checkpoint of the sequence by its step: the one the cells load where a single save
    writes (``paths``: the load jobs, the save record and its sizes read it there), every other
    beside it, its folders suffixed ``-step-<n>``."""
    loaded = loaded_step(variant, train)
    return {step: paths if step == loaded else at_step(paths, step) for step in save_steps(train)}


def at_step(paths: CheckpointPaths, step: int) -> CheckpointPaths:
    """The folders of a checkpoint of the sequence that the cells do not load."""
    return CheckpointPaths(
        checkpoint=f"{paths.checkpoint}-step-{step}",
        full_state=f"{paths.full_state.removesuffix('.pt')}-step-{step}.pt",
        reference=f"{paths.reference}-step-{step}",
    )


def with_paths(item, paths: CheckpointPaths):
    """The save item (training.Item) that writes and checks at ``paths``."""
    return item.changed(paths=paths)


def as_loaded(item):
    """The loader's item (training.Item): for a sequence, ``train.steps`` is the step of the
    checkpoint the cell loads, so that the resume trains on from there."""
    if not item.variant.saves_sequence:
        return item
    return item.changed(train={**item.train, "steps": loaded_step(item.variant, item.train)})


def check_at(check: str, step: int) -> str:
    """A check's name in a reason, for the checkpoint of one step."""
    return f"{check} at step {step}"


def unchanged(
    changed: dict[str, bool], same: dict[str, bool], steps: tuple[int, int]
) -> dict[str, EntryComparison]:
    """The consecutive-checkpoints check: per entry compared, ``changed`` (the saver's
    references at the two steps differ) and ``same`` (the two checkpoints hold equal values).
    An entry the saver changed that the checkpoints hold equal fails (a stale or repeated
    save), naming both steps; one the saver did not change (a learning rate, a frozen
    parameter) may be equal."""
    first, then = steps
    note = f"equal in the checkpoints of steps {first} and {then}, though the saver's state changed"
    entries = {}
    for name in sorted(changed):
        stuck = changed[name] and same[name]
        entries[name] = EntryComparison(not stuck, None, note if stuck else "")
    return entries


def sequence_check(check: str, entries: dict, error: str = "") -> CheckResult:
    """One more check of a sequence's save result (``sequence``; records.verdict reads it):
    its name as the reason gives it, its entries, or why it could not run."""
    return CheckResult(check, entries, error)
