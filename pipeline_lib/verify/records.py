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
from pipeline_lib.verify.axis_table import AXIS_TABLE

if TYPE_CHECKING:
    from pipeline_lib.plan.axes import Variant
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


def summarize(check: str, entries: dict[str, dict]) -> tuple[int, str]:
    """(mismatch count, reason) of one comparison: entry name -> {equal, note, max_abs_diff}."""
    bad = [name for name, e in entries.items() if not e["equal"]]
    if not bad:
        return 0, ""
    first = entries[bad[0]]
    detail = first.get("note") or "differs"
    if first.get("max_abs_diff") is not None and detail == "bytes differ":
        detail += f" (max_abs_diff {first['max_abs_diff']:.3g})"
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


def verdict(save: dict, load: dict, rtol: float, mode: str = "sharded") -> tuple[str, str]:
    """The status and one-line reason of a cell from its save record and load result.

    A check that found a difference makes the cell ``fail`` even when the load then errored
    (a corrupt checkpoint is a finding); a job that died with no check failed names its status.
    Modes strict and non_strict (the saver left an entry out on purpose) check the load's
    account of the missing entry instead of the resumed losses, which differ by design;
    strict_unexpected and non_strict_unexpected (the saver added one) the account of the
    unexpected entry, besides the resumed losses (the model's own state loads whole). One
    function on purpose: the order of its steps is the order of the reason's parts. The reason
    is one printable line (errors.printable): it quotes entry names and messages that come from
    a checkpoint, which may hold newlines and terminal escapes.
    """
    status, reason = _verdict(save, load, rtol, mode)
    return status, printable(reason)


def _verdict(save: dict, load: dict, rtol: float, mode: str) -> tuple[str, str]:
    for side, result in (("save", save), ("load", load)):
        if result["status"] == "skip":
            return "skip", f"{side} layout: {result['reason']}"
    if save["status"] in JOB_FAILURES:
        side = "import" if save.get("existing") else "save"
        return save["status"], f"{side}: {save['reason']}"
    at = f" at step {save['save_step']}" if "save_step" in save else ""  # a save_sequence
    reasons = [
        summarize(f"state dict vs live{at}", save.get("state_check", {}))[1],
        save.get("files_error") or summarize(f"files vs saver{at}", save["files_check"])[1],
        # save_sequence: the other checkpoints' checks and consecutive ones' (sequences.py)
        *(c["error"] or summarize(c["check"], c["entries"])[1] for c in save.get("sequence", [])),
    ]
    if "hf_export" in save and not save["hf_export"]["loads"]:
        reasons.append(f"hf export: {save['hf_export']['reason']}")
    if save.get("frozen_saved"):
        reasons.append(
            f"ignore_frozen_params: the saver's state holds {len(save['frozen_saved'])} frozen "
            f"parameter(s); first {save['frozen_saved'][0]}"
        )
    if load["status"] in JOB_FAILURES:
        # a resume that failed after check 2 ran (worker.load_into) keeps its entries
        reasons.append(summarize("loader vs saver", load.get("entries", {}))[1])
        if not any(reasons):
            return load["status"], f"load: {load['reason']}"
        return "fail", "; ".join(
            [*filter(None, reasons), f"load {load['status']}: {load['reason']}"]
        )
    if load.get("seal_error"):  # sealed mode: the files changed since the save; not loaded
        return "fail", "; ".join([*filter(None, reasons), load["seal_error"]])
    if mode in ("strict", "strict_unexpected"):
        reasons.append(strict_load_reason(_changed(save, mode), load.get("strict_error"), mode))
        return ("fail", "; ".join(filter(None, reasons))) if any(reasons) else ("pass", "")
    reasons.append(summarize("loader vs saver", load["entries"])[1])
    rel = resume_rel_diff(save["resume_losses"], load["resume_losses"])
    if save.get("existing"):
        pass  # no saver's losses: the load layouts must agree (agree_across_layouts)
    elif mode == "non_strict":
        reasons.append(missing_reason(save["dropped_entries"], load["missing_entries"]))
    else:
        if mode == "non_strict_unexpected":
            reported = load.get("unexpected_entries", [])
            reasons.append(unexpected_reason(save["added_entries"], reported))
        reasons.append(_resume_reason(save["resume_losses"], load["resume_losses"], rel, rtol))
    reasons = [r for r in reasons if r]
    if reasons:
        return "fail", "; ".join(reasons)
    return "pass", ""


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


def _changed(save: dict, mode: str) -> list[str]:
    """The entries the saver left out (strict) or added (strict_unexpected) on purpose."""
    return save["added_entries" if mode.endswith("unexpected") else "dropped_entries"]


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


def cell_row(model: str, save: dict, load: dict, spec: ItemSpec) -> dict[str, Any]:
    """One matrix.parquet row. ``save`` is the save job's record, ``load`` the load result of
    this cell (pipeline_lib.job.driver); ``spec`` the load item's spec. Long for a reason: one flat
    literal with a line per MATRIX_SCHEMA column, in schema order, reads against the schema."""
    variant, verify = spec.variant, spec.verify
    low = variant.param_dtype == "bfloat16" or _mixed_precision(save["layout"], load["layout"])
    rtol = verify["resume_rtol_bfloat16" if low else "resume_rtol"]
    status, reason = verdict(save, load, rtol, variant.mode)
    checked = save.get("state_check", {}), save.get("files_check", {}), load.get("entries", {})
    stated, files, loaded = checked
    mismatched = {n for check in checked for n, e in check.items() if not e["equal"]}
    st, lt = save.get("timing", {}), load.get("timing", {})
    env = load.get("env") or save.get("env") or {}
    save_layout, load_layout = save["layout"], load["layout"]
    return {
        "model": model,
        "save_layout": save_layout["name"],
        "save_framework": save_layout["framework"],
        "save_mesh": "x".join(map(str, save_layout["mesh"])),
        "save_world_size": save_layout["world_size"],
        "save_pp_schedule": save_layout.get("schedule"),
        "save_microbatches": save_layout.get("microbatches"),
        "load_layout": load_layout["name"],
        "load_framework": load_layout["framework"],
        "load_mesh": "x".join(map(str, load_layout["mesh"])),
        "load_world_size": load_layout["world_size"],
        "load_pp_schedule": load_layout.get("schedule"),
        "load_microbatches": load_layout.get("microbatches"),
        **{axis: getattr(variant, axis) for axis in AXIS_COLUMNS},
        # The training step of the checkpoint the cell loaded (save_sequence: which one).
        "save_step": save.get(
            "save_step", None if save.get("existing") else spec.train.get("steps")
        ),
        "reference_mode": verify.get("reference", "exact"),
        "status": status,
        "reason": reason,
        "entries_checked": len(set().union(*checked)),
        "entries_mismatched": len(mismatched),
        "state_entries_mismatched": sum(not e["equal"] for e in stated.values()),
        "files_entries_mismatched": sum(not e["equal"] for e in files.values()),
        "load_entries_mismatched": sum(not e["equal"] for e in loaded.values()),
        "max_abs_diff": _max(e.get("max_abs_diff") for check in checked for e in check.values()),
        # The resumed losses of a run that lost an entry on purpose differ by design; those of
        # an existing checkpoint are compared across its load layouts (agree_across_layouts).
        "resume_max_rel_diff": None
        if variant.mode in ("strict", "non_strict", "strict_unexpected") or save.get("existing")
        else resume_rel_diff(save.get("resume_losses", []), load.get("resume_losses", [])),
        "resume_rtol": rtol,
        "resume_losses": load.get("resume_losses"),
        # fresh: a checkpoint of model weights only; the resume made a new optimizer (and LR
        # scheduler) after the load. loaded: the checkpoint's. None: no resume ran.
        "resume_optimizer": load.get("resume_optimizer"),
        # model (its own loss), user (the module's loss) or fallback (pipeline_lib.models._user).
        "loss_source": save.get("loss_source"),
        # Format hf_export: the export loads with from_pretrained equal to the saver's model.
        "hf_export_loads": save["hf_export"]["loads"] if "hf_export" in save else None,
        "missing_entries": ", ".join(load.get("missing_entries", [])) or None,
        "unexpected_entries": ", ".join(load.get("unexpected_entries", [])) or None,
        # Sealed mode: the load job found the seal intact (False: seal_error in the reason).
        "seal_ok": load.get("seal_ok"),
        "save_seconds": st.get("save_s"),
        "save_blocked_seconds": st.get("save_blocked_s"),
        "load_seconds": lt.get("load_s"),
        "verify_seconds": lt.get("verify_s"),
        "files_check_seconds": st.get("files_check_s"),
        "seal_seconds": st.get("seal_s"),
        "seal_check_seconds": lt.get("seal_s"),
        "save_job_startup_seconds": st.get("startup_s"),
        "save_train_seconds": st.get("train_s"),
        "load_job_startup_seconds": lt.get("startup_s"),
        "load_build_seconds": lt.get("build_s"),
        "resume_seconds": lt.get("resume_s"),
        "checkpoint_bytes": save.get("checkpoint_bytes"),
        "checkpoint_files": save.get("checkpoint_files"),
        "save_peak_rss_mb": save.get("peak_rss_mb"),
        "load_peak_rss_mb": load.get("peak_rss_mb"),
        "torch_version": env.get("torch_version"),
        "save_torch_version": save.get("torch_version"),
        "load_torch_version": load.get("torch_version"),
        "backend": env.get("backend"),
        "device": env.get("device"),
        "config_hash": spec.config_hash,
        "git_commit": None,
        "created_at": load.get("created_at") or save.get("created_at"),
        "source_folder": save.get("source_folder"),
        "source_metadata_sha256": save.get("metadata_sha256"),
    }


def _mixed_precision(*layouts: dict) -> bool:
    """A layout computes in a lower precision than its parameters' (Framework.compute_dtype)."""
    from pipeline_lib import frameworks

    known = frameworks.names()
    return any(
        lay["framework"] in known and frameworks.get(lay["framework"]).compute_dtype
        for lay in layouts
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


def _all_equal(*checks: dict | None) -> bool | None:
    """False if a check found this entry different, True if every check ran and found it
    equal, None (unknown) otherwise."""
    ran = [c["equal"] for c in checks if c is not None]
    if False in ran:
        return False
    return True if len(ran) == len(checks) else None


def tensor_rows(model: str, save: dict, load: dict, variant: Variant) -> list[dict[str, Any]]:
    """tensors.parquet rows of one cell: one per state entry seen by any check."""
    stated, files, loaded, meta = (
        save.get("state_check", {}),
        save.get("files_check", {}),
        load.get("entries", {}),
        save.get("entries", {}),
    )
    rows = []
    for name in sorted(set(stated) | set(files) | set(loaded) | set(meta)):
        s, f, ld, m = stated.get(name), files.get(name), loaded.get(name), meta.get(name, {})
        notes = [
            f"{check}: {c['note']}"
            for check, c in (("state", s), ("files", f), ("load", ld))
            if c and c.get("note")
        ]
        rows.append(
            {
                "model": model,
                "save_layout": save["layout"]["name"],
                "load_layout": load["layout"]["name"],
                "save_torch_version": save.get("torch_version"),
                "load_torch_version": load.get("torch_version"),
                **{axis: getattr(variant, axis) for axis in AXIS_COLUMNS},
                "entry": name,
                "kind": m.get("kind"),
                "dtype": m.get("dtype"),
                "shape": m.get("shape"),
                "equal": _all_equal(s, f, ld),
                "state_equal": s["equal"] if s else None,
                "file_equal": f["equal"] if f else None,
                "load_equal": ld["equal"] if ld else None,
                "max_abs_diff": _max([(c or {}).get("max_abs_diff") for c in (s, f, ld)]),
                "note": "; ".join(notes),
            }
        )
    return rows
