"""Cell records: the verdict of a cell from its save and load results, and the Parquet schemas.

Pure logic (no torch): the jobs report facts, this module decides pass/fail and the reason.

Where the verdict runs: in the load job. pipeline_lib.job.driver calls cell_row (hence verdict) when
it writes the load record, and aggregation only gathers those rows into matrix.parquet. A change
here changes the project's code version, so the next run computes every cell again
(pipeline_lib.job.reuse).
The schemas have checked-in copies (tests/schemas, tests/test_schemas.py): a change to a column
is a deliberate edit of both.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline_lib.common.errors import printable
from pipeline_lib.common.layout import Layout
from pipeline_lib.verify.axis_table import AXIS_TABLE
from pipeline_lib.verify.results import (
    EntryComparison,
    ImportRecord,
    LoadResult,
    SaveRecord,
    SaveResult,
    Timing,
)

if TYPE_CHECKING:
    from pipeline_lib.plan.specs import ItemSpec

STATUSES = ("pass", "fail", "error", "crash", "timeout", "skip")
# Job outcomes (before the cell's checks): ok, or the status the whole cell inherits.
JOB_FAILURES = ("error", "crash", "timeout")

# The variant's axes are columns of their own, after the layouts, each named as its axis
# (pipeline_lib.verify.axis_table).
AXIS_COLUMNS = [axis.name for axis in AXIS_TABLE]
CELL_KEYS = [
    "model",
    "save_layout",
    "load_layout",
    "save_torch_version",
    "load_torch_version",
    *AXIS_COLUMNS,
]

MATRIX_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("save_layout", pa.string()),
        ("save_framework", pa.string()),
        ("save_mesh", pa.string()),
        ("save_world_size", pa.int64()),
        ("save_pp_schedule", pa.string()),
        ("save_microbatches", pa.int64()),
        ("load_layout", pa.string()),
        ("load_framework", pa.string()),
        ("load_mesh", pa.string()),
        ("load_world_size", pa.int64()),
        ("load_pp_schedule", pa.string()),
        ("load_microbatches", pa.int64()),
        *((axis, pa.string()) for axis in AXIS_COLUMNS),
        ("save_step", pa.int64()),
        ("reference_mode", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("entries_checked", pa.int64()),
        ("entries_mismatched", pa.int64()),
        ("state_entries_mismatched", pa.int64()),
        ("files_entries_mismatched", pa.int64()),
        ("load_entries_mismatched", pa.int64()),
        ("max_abs_diff", pa.float64()),
        ("resume_max_rel_diff", pa.float64()),
        ("resume_rtol", pa.float64()),
        ("resume_losses", pa.list_(pa.float64())),
        ("resume_optimizer", pa.string()),
        ("loss_source", pa.string()),
        ("hf_export_loads", pa.bool_()),
        ("missing_entries", pa.string()),
        ("unexpected_entries", pa.string()),
        ("seal_ok", pa.bool_()),
        ("save_seconds", pa.float64()),
        ("save_blocked_seconds", pa.float64()),
        ("load_seconds", pa.float64()),
        ("verify_seconds", pa.float64()),
        ("files_check_seconds", pa.float64()),
        ("seal_seconds", pa.float64()),
        ("seal_check_seconds", pa.float64()),
        ("save_job_startup_seconds", pa.float64()),
        ("save_train_seconds", pa.float64()),
        ("load_job_startup_seconds", pa.float64()),
        ("load_build_seconds", pa.float64()),
        ("resume_seconds", pa.float64()),
        ("checkpoint_bytes", pa.int64()),
        ("checkpoint_files", pa.int64()),
        ("save_peak_rss_mb", pa.float64()),
        ("load_peak_rss_mb", pa.float64()),
        ("torch_version", pa.string()),
        ("save_torch_version", pa.string()),
        ("load_torch_version", pa.string()),
        ("backend", pa.string()),
        ("device", pa.string()),
        ("config_hash", pa.string()),
        ("git_commit", pa.string()),
        ("created_at", pa.string()),
        ("source_folder", pa.string()),
        ("source_metadata_sha256", pa.string()),
    ]
)

TENSORS_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("save_layout", pa.string()),
        ("load_layout", pa.string()),
        ("save_torch_version", pa.string()),
        ("load_torch_version", pa.string()),
        *((axis, pa.string()) for axis in AXIS_COLUMNS),
        ("entry", pa.string()),
        ("kind", pa.string()),
        ("dtype", pa.string()),
        ("shape", pa.list_(pa.int64())),
        ("equal", pa.bool_()),
        ("state_equal", pa.bool_()),
        ("file_equal", pa.bool_()),
        ("load_equal", pa.bool_()),
        ("max_abs_diff", pa.float64()),
        ("note", pa.string()),
    ]
)


def summarize(check: str, entries: dict[str, EntryComparison]) -> tuple[int, str]:
    """(mismatch count, reason) of one check's comparisons (entry name -> EntryComparison)."""
    bad = [name for name, e in entries.items() if not e.equal]
    if not bad:
        return 0, ""
    first = entries[bad[0]]
    detail = first.note or "differs"
    if first.max_abs_diff is not None and detail == "bytes differ":
        detail += f" (max_abs_diff {first.max_abs_diff:.3g})"
    return len(
        bad
    ), f"{check}: {len(bad)} of {len(entries)} entries differ; first {bad[0]}: {detail}"


def resume_rel_diff(saver: list[float], loader: list[float]) -> float | None:
    if not saver or len(saver) != len(loader):
        return None
    diffs = _rel_diffs(saver, loader)
    return math.nan if any(map(math.isnan, diffs)) else max(diffs)


def _rel_diffs(saver: list[float], loader: list[float]) -> list[float]:
    return [abs(a - b) / max(abs(a), 1e-30) for a, b in zip(saver, loader, strict=True)]


def verdict(
    save: SaveResult, load: LoadResult, rtol: float, mode: str = "sharded"
) -> tuple[str, str]:
    """The status and one-line reason of a cell from its save record (an ImportRecord for an
    existing checkpoint) and load result.

    A check that found a difference makes the cell ``fail`` even when the load then errored
    (a corrupt checkpoint is a finding); a job that died with no check failed names its status.
    Modes strict and non_strict (the saver left an entry out on purpose) check the load's
    account of the missing entry instead of the resumed losses, which differ by design;
    strict_unexpected and non_strict_unexpected (the saver added one) the account of the
    unexpected entry, besides the resumed losses (the model's own state loads whole). The
    order of its steps is the order of the reason's parts. The reason is one printable line
    (errors.printable): it quotes entry names and messages that come from a checkpoint, which
    may hold newlines and terminal escapes.
    """
    status, reason = _verdict(save, load, rtol, mode)
    return status, printable(reason)


def _verdict(save: SaveResult, load: LoadResult, rtol: float, mode: str) -> tuple[str, str]:
    for side, result in (("save", save), ("load", load)):
        if result.status == "skip":
            return "skip", f"{side} layout: {result.reason}"
    if save.status in JOB_FAILURES:
        side = "import" if isinstance(save, ImportRecord) else "save"
        return save.status, f"{side}: {save.reason}"
    reasons = _save_reasons(save)
    if load.status in JOB_FAILURES:
        # a resume that failed after check 2 ran (worker.load_into) keeps its entries
        reasons.append(summarize("loader vs saver", load.entries or {})[1])
        if not any(reasons):
            return load.status, f"load: {load.reason}"
        return "fail", "; ".join([*filter(None, reasons), f"load {load.status}: {load.reason}"])
    if load.seal_error:  # sealed mode: the files changed since the save; not loaded
        return "fail", "; ".join([*filter(None, reasons), load.seal_error])
    if mode in ("strict", "strict_unexpected"):
        reasons.append(strict_load_reason(_changed(save, mode), load.strict_error, mode))
    else:
        reasons += _loaded_reasons(save, load, rtol, mode)
    reasons = [r for r in reasons if r]
    return ("fail", "; ".join(reasons)) if reasons else ("pass", "")


def _save_reasons(save: SaveResult) -> list[str]:
    """What the save side's checks found (checks 0 and 1, a save sequence's other checks, the
    HF export, frozen parameters saved); '' for a check that found nothing."""
    at = f" at step {save.save_step}" if save.save_step is not None else ""  # a save_sequence
    reasons = [
        summarize(f"state dict vs live{at}", save.state_check or {})[1],
        save.files_error or summarize(f"files vs saver{at}", save.files_check)[1],
        # save_sequence: the other checkpoints' checks and consecutive ones' (sequences.py)
        *(c.error or summarize(c.check, c.entries)[1] for c in save.sequence or []),
    ]
    if save.hf_export is not None and not save.hf_export.loads:
        reasons.append(f"hf export: {save.hf_export.reason}")
    if save.frozen_saved:
        reasons.append(
            f"ignore_frozen_params: the saver's state holds {len(save.frozen_saved)} frozen "
            f"parameter(s); first {save.frozen_saved[0]}"
        )
    return reasons


def _loaded_reasons(save: SaveResult, load: LoadResult, rtol: float, mode: str) -> list[str]:
    """What check 2 found, then the non-strict load's account of the entry the saver left out
    or added, and the resumed losses against the saver's (not an existing checkpoint's: its
    load layouts must agree instead, agree_across_layouts)."""
    reasons = [summarize("loader vs saver", load.entries)[1]]
    rel = resume_rel_diff(save.resume_losses, load.resume_losses)
    if isinstance(save, ImportRecord):
        return reasons
    if mode == "non_strict":
        return [*reasons, missing_reason(save.dropped_entries, load.missing_entries)]
    if mode == "non_strict_unexpected":
        reported = load.unexpected_entries or []
        reasons.append(unexpected_reason(save.added_entries, reported))
    return [*reasons, _resume_reason(save.resume_losses, load.resume_losses, rel, rtol)]


def _resume_reason(saver: list[float], loader: list[float], rel, rtol: float) -> str:
    """'' if the resumed losses agree within ``rtol`` (``rel``: their largest difference)."""
    if rel is None:
        return f"resume: saver recorded {len(saver)} losses, loader {len(loader)}"
    if not rel <= rtol:  # NaN fails too
        step = _worst_step(saver, loader)
        return (
            f"resume: loss differs by {rel:.3g} (relative) at resume step {step}, "
            f"above resume_rtol {rtol:g}"
        )
    return ""


def _changed(save: SaveResult, mode: str) -> list[str]:
    """The entries the saver left out (strict) or added (strict_unexpected) on purpose."""
    return save.added_entries if mode.endswith("unexpected") else save.dropped_entries


def strict_load_reason(changed: list[str], error: str | None, mode: str = "strict") -> str:
    """'' if the strict load of a checkpoint without (mode strict) or with an added
    (strict_unexpected) entry ``changed`` failed naming it. The load names a model entry by its
    key in the model's state dict (``fc1.bias``), without the checkpoint's ``model.``."""
    added = mode == "strict_unexpected"
    with_or_without, kind = ("with", "unexpected") if added else ("without", "missing")
    if error is None:
        return f"strict load: a checkpoint {with_or_without} {changed[0]} loaded without an error"
    key = changed[0].removeprefix("model.") if added else changed[0]
    if key not in error:
        return f"strict load: failed without naming the {kind} entry {changed[0]}: {error}"
    return ""


def missing_reason(dropped: list[str], reported: list[str]) -> str:
    """'' if a non-strict load reported exactly the entries the saver left out."""
    if sorted(reported) == sorted(dropped):
        return ""
    return (
        f"non-strict load: reported missing [{', '.join(reported)}], "
        f"the saver left out [{', '.join(dropped)}]"
    )


def unexpected_reason(added: list[str], reported: list[str]) -> str:
    """'' if a non-strict load reported exactly the entries the saver added as unexpected."""
    if sorted(reported) == sorted(added):
        return ""
    return (
        f"non-strict load: reported unexpected [{', '.join(reported)}], "
        f"the saver added [{', '.join(added)}]"
    )


def _worst_step(saver: list[float], loader: list[float]) -> int:
    diffs = _rel_diffs(saver, loader)
    return max(range(len(diffs)), key=lambda i: math.inf if math.isnan(diffs[i]) else diffs[i])


def _max(values) -> float | None:
    values = [v for v in values if v is not None]
    return max(values) if values else None


def cell_row(
    model: str, save: SaveRecord, load: LoadResult, spec: ItemSpec, load_torch: str
) -> dict[str, Any]:
    """One matrix.parquet row. ``save`` is the save job's record (an existing checkpoint's
    import record), ``load`` the load result of this cell (pipeline_lib.job.driver); ``spec``
    the load item's spec, ``load_torch`` the load job's torch version. Columns in groups, each
    group in MATRIX_SCHEMA's order."""
    variant, verify = spec.variant, spec.verify
    low = variant.param_dtype == "bfloat16" or _mixed_precision(save.layout, spec.layout)
    rtol = verify["resume_rtol_bfloat16" if low else "resume_rtol"]
    status, reason = verdict(save, load, rtol, variant.mode)
    imported = save if isinstance(save, ImportRecord) else None
    env = load.env or save.env
    return {
        "model": model,
        **_layout_columns("save", save.layout),
        **_layout_columns("load", spec.layout),
        **{axis: getattr(variant, axis) for axis in AXIS_COLUMNS},
        # The training step of the checkpoint the cell loaded (save_sequence: which one).
        "save_step": _save_step(save, spec),
        "reference_mode": verify.get("reference", "exact"),
        "status": status,
        "reason": reason,
        **_check_columns(save, load),
        **_resume_columns(save, load, variant.mode, rtol),
        # Format hf_export: the export loads with from_pretrained equal to the saver's model.
        "hf_export_loads": save.hf_export.loads if save.hf_export is not None else None,
        "missing_entries": ", ".join(load.missing_entries or []) or None,
        "unexpected_entries": ", ".join(load.unexpected_entries or []) or None,
        # Sealed mode: the load job found the seal intact (False: seal_error in the reason).
        "seal_ok": load.seal_ok,
        **_cost_columns(save, load),
        "torch_version": env and env.torch_version,
        "save_torch_version": save.torch_version,
        "load_torch_version": load_torch,
        "backend": env and env.backend,
        "device": env and env.device,
        "config_hash": spec.config_hash,
        "git_commit": None,
        "created_at": load.created_at or save.created_at,
        "source_folder": imported and imported.source_folder,
        "source_metadata_sha256": imported and imported.metadata_sha256,
    }


def _save_step(save: SaveRecord, spec: ItemSpec) -> int | None:
    """The step of the checkpoint a cell loads: a save sequence's chosen one, else the saver's
    last training step (unknown for an existing checkpoint)."""
    if save.save_step is not None:
        return save.save_step
    return None if isinstance(save, ImportRecord) else spec.train.get("steps")


def _layout_columns(side: str, layout: Layout) -> dict[str, Any]:
    """The columns of a cell's save or load layout (``side``)."""
    return {
        f"{side}_layout": layout.name,
        f"{side}_framework": layout.framework,
        f"{side}_mesh": "x".join(map(str, layout.mesh)),
        f"{side}_world_size": layout.world_size,
        f"{side}_pp_schedule": layout.schedule,
        f"{side}_microbatches": layout.microbatches,
    }


def _check_columns(save: SaveResult, load: LoadResult) -> dict[str, Any]:
    """The entries checks 0, 1 and 2 compared and found different."""
    checked = save.state_check or {}, save.files_check or {}, load.entries or {}
    stated, files, loaded = checked
    mismatched = {n for check in checked for n, e in check.items() if not e.equal}
    return {
        "entries_checked": len(set().union(*checked)),
        "entries_mismatched": len(mismatched),
        "state_entries_mismatched": sum(not e.equal for e in stated.values()),
        "files_entries_mismatched": sum(not e.equal for e in files.values()),
        "load_entries_mismatched": sum(not e.equal for e in loaded.values()),
        "max_abs_diff": _max(e.max_abs_diff for check in checked for e in check.values()),
    }


def _resume_columns(save: SaveResult, load: LoadResult, mode: str, rtol: float) -> dict:
    """The loader's resume: its losses, how far they are from the saver's, the optimizer it
    resumed with, where the loss came from."""
    return {
        # The resumed losses of a run that lost an entry on purpose differ by design; those of
        # an existing checkpoint are compared across its load layouts (agree_across_layouts).
        "resume_max_rel_diff": None
        if mode in ("strict", "non_strict", "strict_unexpected") or isinstance(save, ImportRecord)
        else resume_rel_diff(save.resume_losses or [], load.resume_losses or []),
        "resume_rtol": rtol,
        "resume_losses": load.resume_losses,
        # fresh: a checkpoint of model weights only; the resume made a new optimizer (and LR
        # scheduler) after the load. loaded: the checkpoint's. None: no resume ran.
        "resume_optimizer": load.resume_optimizer,
        # model (its own loss), user (the module's loss) or fallback (pipeline_lib.models._user).
        "loss_source": save.loss_source,
    }


def _cost_columns(save: SaveRecord, load: LoadResult) -> dict[str, Any]:
    """What the cell cost: the seconds of each phase, the checkpoint's size, peak memory."""
    st, lt = save.timing or Timing(), load.timing or Timing()
    return {
        "save_seconds": st.save_s,
        "save_blocked_seconds": st.save_blocked_s,
        "load_seconds": lt.load_s,
        "verify_seconds": lt.verify_s,
        "files_check_seconds": st.files_check_s,
        "seal_seconds": st.seal_s,
        "seal_check_seconds": lt.seal_s,
        "save_job_startup_seconds": st.startup_s,
        "save_train_seconds": st.train_s,
        "load_job_startup_seconds": lt.startup_s,
        "load_build_seconds": lt.build_s,
        "resume_seconds": lt.resume_s,
        "checkpoint_bytes": save.checkpoint_bytes,
        "checkpoint_files": save.checkpoint_files,
        "save_peak_rss_mb": save.peak_rss_mb,
        "load_peak_rss_mb": load.peak_rss_mb,
    }


def _mixed_precision(*layouts: Layout) -> bool:
    """A layout computes in a lower precision than its parameters' (Framework.compute_dtype)."""
    from pipeline_lib import frameworks

    known = frameworks.names()
    return any(
        lay.framework in known and frameworks.get(lay.framework).compute_dtype for lay in layouts
    )


def agree_across_layouts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cells of an existing checkpoint have no saver's losses: the resumed losses of its
    load layouts (per variant and load torch version) must agree with their median, step by
    step, within resume_rtol. Sets ``resume_max_rel_diff`` of those cells and fails a passing
    cell that does not agree; other rows are returned as they are. Runs at aggregation (the
    cells come from different load jobs)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["save_framework"] == "existing" and row["resume_losses"]:
            key = tuple(row[k] for k in CELL_KEYS if k != "load_layout")
            groups.setdefault(key, []).append(row)
    for group in groups.values():
        losses = [row["resume_losses"] for row in group]
        median = [statistics.median(step) for step in zip(*losses, strict=False)]
        for row in group:
            row["resume_max_rel_diff"] = rel = resume_rel_diff(median, row["resume_losses"])
            if row["status"] == "pass" and not (rel is not None and rel <= row["resume_rtol"]):
                row["status"], row["reason"] = "fail", _disagreement(median, row, len(group))
    return rows


def _disagreement(median: list[float], row: dict[str, Any], layouts: int) -> str:
    losses, rel = row["resume_losses"], row["resume_max_rel_diff"]
    if rel is None:
        return f"resume: {len(losses)} losses where the other load layouts have {len(median)}"
    return (
        f"resume: loss differs by {rel:.3g} (relative) from the median of the {layouts} load "
        f"layouts at resume step {_worst_step(median, losses)}, above resume_rtol "
        f"{row['resume_rtol']:g}"
    )


def _all_equal(*checks: EntryComparison | None) -> bool | None:
    """False if a check found this entry different, True if every check ran and found it
    equal, None (unknown) otherwise."""
    ran = [c.equal for c in checks if c is not None]
    if False in ran:
        return False
    return True if len(ran) == len(checks) else None


def tensor_rows(
    model: str, save: SaveRecord, load: LoadResult, spec: ItemSpec, load_torch: str
) -> list[dict[str, Any]]:
    """tensors.parquet rows of one cell: one per state entry seen by any check (arguments as
    cell_row's)."""
    stated, files, loaded = save.state_check or {}, save.files_check or {}, load.entries or {}
    meta = save.entries or {}
    cell = {
        "model": model,
        "save_layout": save.layout.name,
        "load_layout": spec.layout.name,
        "save_torch_version": save.torch_version,
        "load_torch_version": load_torch,
        **{axis: getattr(spec.variant, axis) for axis in AXIS_COLUMNS},
    }
    rows = []
    for name in sorted(set(stated) | set(files) | set(loaded) | set(meta)):
        s, f, ld, m = stated.get(name), files.get(name), loaded.get(name), meta.get(name)
        found = (("state", s), ("files", f), ("load", ld))
        rows.append(
            {
                **cell,
                "entry": name,
                "kind": m and m.kind,
                "dtype": m and m.dtype,
                "shape": m and m.shape,
                "equal": _all_equal(s, f, ld),
                "state_equal": s and s.equal,
                "file_equal": f and f.equal,
                "load_equal": ld and ld.equal,
                "max_abs_diff": _max([c.max_abs_diff for c in (s, f, ld) if c]),
                "note": "; ".join(f"{check}: {c.note}" for check, c in found if c and c.note),
            }
        )
    return rows
