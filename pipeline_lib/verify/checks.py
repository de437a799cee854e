"""The checks a job runs against the saver's reference (docs: Verification): state dict vs live
(check 0, save side), files vs saver (check 1, save side), loader vs saver (check 2, load
side). Every rank compares its own part of every entry, no collective per entry; rank 0 gets
the merged comparisons ({} on the other ranks). Imports torch; collectives on all ranks.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch.distributed as dist
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from pipeline_lib.common.errors import one_line
from pipeline_lib.verify import engine_files, mapped_reader, sealed_mode
from pipeline_lib.verify.bitwise import (
    EntryComparison,
    ParamNames,
    merge,
    shared_storage,
    unmatched,
)
from pipeline_lib.verify.entries import EMPTY_STATE, PARAM_GROUPS, UNEXPECTED_ENTRY
from pipeline_lib.verify.live import Anatomy
from pipeline_lib.verify.readers import checkpoint_entries, file_entries
from pipeline_lib.verify.reference import Reference, load_form_dir
from pipeline_lib.verify.untrusted import SafeFileSystemReader

if TYPE_CHECKING:  # the job's types; a check reads what the job hands it
    from pipeline_lib.job.training import Item
    from pipeline_lib.plan.specs import Source


def against_reference(
    flat: dict,
    reference_path: str,
    side: str,
    anatomy: Anatomy,
    skip=(),
    drop_first: bool = False,
    shared: dict[str, str] | None = None,
    form: str | None = None,
    against=None,
    stage: bool = False,
) -> dict[str, EntryComparison]:
    """Every rank's part of every entry of ``flat`` (a state of ``side``: "the saver's state
    dict", "the loader's state", ...) vs the saver's reference; entries sharing storage the
    model does not tie fail too. ``skip``: entries not to compare; ``drop_first`` (fault
    drop_loaded_entry): leave out the first on purpose; ``shared``: more entries that share
    storage (name -> note); ``form``: the reference's entries in the loader's form
    (``Reference``); ``against``: another reference than the saver's (sealed mode: the files,
    pipeline_lib.verify.sealed_mode.Files; not with ``stage``, config.py refuses the pair);
    ``stage``: each rank holds a pipeline stage's part of each list entry (an optimizer param
    group's names): the parts together must hold the saver's list."""
    reference = against if against is not None else Reference(reference_path, form)
    names = sorted(set(flat) - set(skip) - ({min(reference)} if drop_first else set()))
    wanted = {name: flat[name] for name in names if name in reference}
    mine = reference.compare_many(wanted, part=True) if stage else reference.compare_many(wanted)
    parts = {n: flat[n] for n in names if stage and n in reference and isinstance(flat[n], list)}
    shared = {**(shared or {}), **shared_storage({n: flat[n] for n in names}, anatomy.canonical)}
    for name, note in shared.items():
        found = mine.get(name, EntryComparison(True, None))
        detail = "" if found.equal else f"; {found.note}"
        mine[name] = EntryComparison(False, found.max_abs_diff, note + detail)
    extra = [name for name in names if name not in reference]
    every_rank = _gather((mine, extra, parts))
    if every_rank is None:
        return {}
    entries = {
        name: merge([part[name] for part, *_ in every_rank if name in part])
        for name in sorted(set().union(*(part for part, *_ in every_rank)))
    }
    entries.update(_uncovered(reference, [held for *_, held in every_rank]))
    held_by_rank = [{*part, *names} for part, names, _ in every_rank]
    entries.update(_group_gaps(sorted(set(reference) - set(skip)), held_by_rank, side))
    for name in sorted(set().union(*(names for _, names, _ in every_rank))):
        entries.setdefault(name, unmatched("not in the saver's state"))
    for name in set(reference) - set(skip):
        entries.setdefault(name, unmatched(f"missing in {side}"))
    return entries


def _group_gaps(reference: list[str], held_by_rank: list[set], side: str) -> dict:
    """A param group's settings are on every rank whose optimizer has the group (every rank
    of a replicated or sharded layout; every stage that holds one of its parameters): an entry
    ``optim.param_groups.<group>.<key>`` of the reference that a rank holding other keys of
    that group lacks is not equal, naming the first such rank (a stage whose loaded group came
    without its hyperparameters would otherwise pass, as another stage holds them)."""
    groups_by_rank = [{h.rpartition(".")[0] for h in held} for held in held_by_rank]
    found = {}
    for name in (n for n in reference if n.startswith(PARAM_GROUPS)):
        group = name.rpartition(".")[0]
        for rank, (held, groups) in enumerate(zip(held_by_rank, groups_by_rank, strict=True)):
            if name not in held and group in groups:
                found[name] = unmatched(f"missing on rank {rank} in {side} (its group {group})")
                break
    return found


def _uncovered(reference: Reference, every_rank: list[dict]) -> dict:
    """The list entries pipeline stages hold parts of where no rank holds some item of the
    saver's list: not equal, naming the first such item."""
    found = {}
    for name in set().union(*every_rank):
        union = reference.meta[name]["value"]
        held = [value for parts in every_rank for value in parts.get(name, [])]
        missing = [v for v in union if v not in held]
        if missing:
            note = (
                f"the stages' parts lack {len(missing)} of {len(union)} items; first {missing[0]!r}"
            )
            found[name] = unmatched(note)
    return found


def files_vs_saver(item: Item) -> tuple[dict[str, EntryComparison], str]:
    """Read back what the load jobs will read, every rank a share of the entries in a
    process-group-free reader (as a process without the saving ranks reads it), and compare
    each bit for bit with the saver's reference. Rank 0 gets the entries' comparisons, or a
    reason the checkpoint cannot be read ({} and "" on other ranks)."""
    paths, variant = item.spec.paths, item.variant
    reference = Reference(paths.reference)
    path = paths.read_by(variant)
    share = (dist.get_rank(), dist.get_world_size())
    entries, error = {}, ""
    try:
        if variant.reads_full_state:
            read = file_entries(path, share)
        elif variant.engine == "torch_checkpointing":
            read = engine_files.entries(path, share)
        elif variant.format.startswith("safetensors"):
            read = checkpoint_entries(path, True, share)
        else:  # entries compared on the files' mapped pages, the rest read by dcp.load
            read = checkpoint_entries(path, False, share, _mapped_vs(path, reference, entries))
        for name, value in read:
            if isinstance(value, BaseException):
                entries[name] = unmatched(f"unreadable: {one_line(value)}")
            elif name not in reference:
                entries[name] = unmatched("not in the saver's state")
            else:
                entries[name] = reference.compare(name, value)
    except (Exception, CheckpointException) as exc:
        error = f"files vs saver: cannot read checkpoint {path}: {one_line(exc)}"
    every_rank = _gather((entries, error))
    if every_rank is None:
        return {}, ""
    errors = [e for _, e in every_rank if e]
    if errors:
        return {}, errors[0]
    entries = {name: c for part, _ in every_rank for name, c in part.items()}
    # An empty optimizer state ({}) has nothing to write: DCP's files cannot hold it (check 2
    # compares the loader's with the saver's).
    for name in (n for n in reference if not n.endswith(f".{EMPTY_STATE}")):
        entries.setdefault(name, unmatched("missing in the checkpoint"))
    return entries, ""


def _mapped_vs(path: str, reference: Reference, entries: dict):
    """For checkpoint_entries' ``skip``: compare a tensor entry's chunks, on the files' mapped pages
    (pipeline_lib.verify.mapped_reader), with the saver's reference into ``entries``; False
    (dcp.load reads it whole) where the reference holds no such tensor or a chunk is not the plain
    case."""
    metadata = SafeFileSystemReader(path).read_metadata()

    def compared(name: str) -> bool:
        expected, meta = metadata.state_dict_metadata[name], reference.meta.get(name, {})
        if not isinstance(expected, TensorStorageMetadata) or (
            meta.get("dtype"),
            meta.get("shape"),
        ) != (expected.properties.dtype, list(expected.size)):
            return False
        with mapped_reader.open_parts(path, metadata, name) as chunks:
            if chunks is None:
                return False
            entries[name] = merge([reference.compare_part(name, c) for c in chunks])
        return True

    return compared


def loader_vs_saver(
    item: Item, state: dict, live: dict, anatomy: Anatomy, source: Source, report, *,
    sealed: bool = False, stage: bool = False, model_only: bool = False,
) -> dict[str, EntryComparison]:  # fmt: skip
    """The loader's state, twice: ``state``, as get_state_dict gives it in the loader's mode
    (flat, in the variant's format), and ``live``, read from its live objects
    (pipeline_lib.verify.live), each against the saver's reference in that form. An entry is
    equal only if both are; a difference only the live objects show is noted ``live: ...``.
    ``report``: the non-strict load's account (checkpoint_io.LoadReport), checked against the
    saver's in records.verdict: those entries are not compared here. ``anatomy``: the loader's
    model's entries; ``stage``: the loader is a pipeline stage (it holds only its own).
    ``model_only``: a checkpoint of model weights only (an existing one whose entries are all
    the model's): the loader's optimizer and LR scheduler are not compared (nothing loaded them;
    the resume starts with a new optimizer)."""
    fault, reference, variant = source.fault, source.paths.reference, item.variant
    form = load_form_dir(reference) if variant.forms_differ else None
    # Sealed mode: the files are the reference (their seal held: pipeline_lib.verify.sealed_mode).
    files = sealed_mode.files_reference(variant, source.paths) if sealed else None
    if files is not None:
        files.keep = True  # the parts the first comparison reads serve the second too
    # Reported missing or unexpected by the non-strict load: not in the loader's model.
    skip = {*report.missing, *report.unexpected, *report.uncompared}
    if variant.adds_entry:
        skip.add(UNEXPECTED_ENTRY)
    if model_only:
        skip |= {name for name in (*state, *live) if not name.startswith("model.")}
    through_api = against_reference(
        names_as_sets(state), reference, "the loader's state", anatomy, skip=skip,
        drop_first=fault == "drop_loaded_entry", form=form, against=files, stage=stage,
    )  # fmt: skip
    if files is not None:
        files.keep = False
    from_live = against_reference(
        names_as_sets(live), reference, "the loader's live state", anatomy, skip,
        form=form, against=files, stage=stage,
    )  # fmt: skip
    for name, found in from_live.items():
        if not found.equal and (name not in through_api or through_api[name].equal):
            through_api[name] = replace(found, note=f"live: {found.note}")
    return through_api


def names_as_sets(flat: dict) -> dict:
    """The loader's param groups' parameter names as compare.ParamNames (compared as sets)."""
    names = (n for n in flat if n.startswith(PARAM_GROUPS) and n.endswith(".params"))
    return {**flat, **{n: ParamNames(flat[n]) for n in names if isinstance(flat[n], list)}}


def _gather(mine) -> list | None:
    """Every rank's ``mine`` on rank 0 (None on the other ranks)."""
    every_rank = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, every_rank, dst=0)
    return every_rank
