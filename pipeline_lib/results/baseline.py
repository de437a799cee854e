"""Compare a run with a baseline: reason signatures, a comparison class per cell, the CI gate.

A baseline is either a previous ``matrix.parquet`` or an expectations file (YAML, e.g.
``expectations/torch-2.14.1.yaml``, pipeline_lib.plan.expectations): the grids measured on a release
and the known findings in them as cell patterns -> expected status and reason signature, every
other measured cell expected to ``pass``. Pure (pandas, no torch).

Each cell is judged by one of (column ``judged_by``):

- ``pipeline``: a cell the pipeline's grid skips by design (pipeline_lib.plan.axes.conflict,
  layout_conflict: ``format safetensors is tested with mode sharded only``) must be that skip,
  with that reason, whatever the baseline says: the rule comes from the code, not from a file;
- ``baseline``: a cell the baseline measured (a matrix: one of its rows; an expectations file: a
  cell of one of its measured grids);
- nothing: a cell the baseline did not measure is ``new``.

Comparison classes (column ``comparison``):

- ``same``: the status and the reason signature expected;
- ``regression``: ``pass`` expected, the cell does not pass;
- ``fixed``: a non-pass status expected, the cell passes;
- ``changed``: another non-pass status, or the same status with another reason signature;
- ``new``: not measured by the baseline (not judged).

Baseline cells the run does not have are listed apart (``missing``), as are expectations that
match no cell of the run (``unused``): reported, never a gate failure. The gate fails on
``regression`` and ``changed`` (and ``new`` non-pass cells with ``fail_on_new``), and when it
judged nothing: an empty matrix, or no cell the baseline measured.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline_lib.plan.expectations import (  # noqa: F401 - the gate's baseline, re-exported
    PATTERN_COLUMNS,
    Expectation,
    Expectations,
    ExpectationsError,
    layout_key,
    load_baseline,
    load_expectations,
)
from pipeline_lib.plan.matrix_file import MatrixFileError, read_matrix, with_default_axes
from pipeline_lib.results import display
from pipeline_lib.verify.records import AXIS_COLUMNS, CELL_KEYS

COMPARISONS = ("regression", "changed", "fixed", "new", "same")
FAILING = ("regression", "changed")
VERSION_KEYS = ("save_torch_version", "load_torch_version")
# The cell without its torch releases: a run of a new release is compared cell by cell with a
# baseline of an older one.
POSITION_KEYS = [k for k in CELL_KEYS if k not in VERSION_KEYS]
# Column ``judged_by``: what a cell was compared with.
BY_PIPELINE, BY_BASELINE, NOT_JUDGED = "pipeline", "baseline", ""

# --- reason signatures ------------------------------------------------------------------------
# Applied in order. What varies between runs and releases goes; the words of the failure stay:
# exception types, messages, check names, entry names (``model.blocks.0.fc1.bias``: the digit
# inside a dotted name is part of the name), step names.
_NUMBER = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf)"
_SIGNATURE_RULES: list[tuple[re.Pattern, str]] = [
    # Addresses and ports: 127.0.0.1:29500, [::1]:1234, localhost:29500, host.domain:80.
    (re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b"), "<addr>"),
    (re.compile(r"\[[0-9a-fA-F:]*::[0-9a-fA-F:]*\](?::\d+)?"), "<addr>"),
    (re.compile(r"\b(?:localhost|[\w-]+(?:\.[\w-]+)+):\d{2,5}\b"), "<addr>"),
    # Paths, absolute or relative (at least one slash inside a run of path characters).
    (re.compile(r"(?<![\w.])(?:/[\w.+@=-]+)+/?|\b[\w.+@=-]+(?:/[\w.+@=-]+)+/?"), "<path>"),
    # Hex: addresses, hashes.
    (re.compile(r"\b0x[0-9a-fA-F]+\b"), "<hex>"),
    (re.compile(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{8,}\b"), "<hex>"),
    # Release strings: 2.13.0+cpu, 2.15.0.dev20260101.
    (re.compile(r"\b\d+\.\d+\.\d+(?:[+.][\w.]+)?"), "<version>"),
    # Ranks, process ids: the rank a failure hits first depends on scheduling and world size.
    (re.compile(r"\brank\(s\) \[[\d, ]*\]"), "rank(s) N"),
    (re.compile(r"\b(rank|ranks|pid|process|local_rank|node)\s+\d+"), r"\1 N"),
    # The unit in progress (a load cell's id names its layouts, not the failure).
    (re.compile(r"\bduring cell \S+"), "during cell"),
    # Numbers standing on their own (not inside a name: blocks.0.fc1, fsdp2_4, 2x2).
    (re.compile(rf"(?<![\w.]){_NUMBER}(?![\w])"), "N"),
    (re.compile(r"N(?:\s*,\s*N)+"), "N"),
]
_SET = re.compile(r"\{([^{}]*)\}")


def _sorted_set(match: re.Match) -> str:
    """A Python set's repr lists its items in hash order, which changes from run to run."""
    items = [item.strip() for item in match.group(1).split(",")]
    return "{" + ", ".join(sorted(items)) + "}"


def signature(reason: str | None) -> str:
    """The reason with what varies between runs, machines and releases taken out: numbers,
    paths, ranks, addresses, hex, release strings; set items in sorted order; whitespace
    collapsed. '' for no reason."""
    if reason is None or (isinstance(reason, float) and pd.isna(reason)):
        return ""
    text = " ".join(str(reason).split())
    for pattern, repl in _SIGNATURE_RULES:
        text = pattern.sub(repl, text)
    return _SET.sub(_sorted_set, text)


def signature_matches(pattern: str, sig: str) -> bool:
    """``pattern``: a signature in which ``*`` stands for any text (nothing else is special:
    signatures hold brackets and question marks). Greedy, segment by segment, left to right:
    each segment is searched for once, never backtracked into, so the time is bounded by the
    lengths (a regex of ``.*`` took 52 s on a 60-character reason and many ``*``)."""
    first, *middle = pattern.split("*")
    if not middle:
        return pattern == sig
    last = middle.pop()
    if len(sig) < len(first) + len(last) or not (sig.startswith(first) and sig.endswith(last)):
        return False
    position, end = len(first), len(sig) - len(last)
    for part in middle:
        found = sig.find(part, position, end)
        if found < 0:
            return False
        position = found + len(part)
    return True


# --- the baseline ------------------------------------------------------------------------------
# --- comparison -------------------------------------------------------------------------------
def planned_skip(row: dict) -> tuple[str, str] | None:
    """(side, reason) of a cell the pipeline's grid skips by design, the reason as the cell's
    record gives it (records.verdict); None for a cell the grid runs. From the cell's axis
    values and world sizes alone (pipeline_lib.plan.axes), as the grid decides it for the jobs."""
    from pipeline_lib.plan.axes import Variant, conflict, layout_conflict
    from pipeline_lib.verify.records import verdict
    from pipeline_lib.verify.results import LoadResult, SaveResult

    variant = Variant(**{axis: row[axis] for axis in AXIS_COLUMNS})
    reasons = []
    for side in ("save", "load"):
        world_size = row.get(f"{side}_world_size")
        # An existing checkpoint's side is its import job, which skips nothing.
        existing = side == "save" and row.get("save_framework") == "existing"
        reasons.append(
            None
            if existing
            else conflict(variant)
            or layout_conflict(variant, side, _int(world_size), row.get(f"{side}_framework"))
        )
    if not any(reasons):
        return None
    save, load = (
        typed(status="skip" if why else "ok", reason=why or "")
        for typed, why in zip((SaveResult, LoadResult), reasons, strict=True)
    )
    return "save" if reasons[0] else "load", verdict(save, load, 0.0)[1]


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):  # None, NaN (an existing checkpoint's side)
        return None


def _key(values) -> tuple:
    """A cell key as a dict key: NaN (a missing value pandas read) as None, as merge pairs it."""
    return tuple(None if isinstance(v, float) and v != v else v for v in values)


def _by_pipeline(row: dict) -> str | None:
    """The reason a cell must be skipped with when the pipeline's rule judges it, else None. A
    load side's planned skip does not judge a cell whose save side skipped or failed first (a
    skip the save job decided, e.g. a TP degree that does not divide the model's heads; torch's
    error in the save job): records.verdict names the save side, and the baseline judges it."""
    planned = planned_skip(row)
    if planned is None:
        return None
    side, reason = planned
    save_first = row["status"] != "pass" and str(row["reason"]).startswith(
        ("save layout: ", "save: ")
    )
    if side == "load" and save_first:
        return None
    return reason


def classify(status: str, sig: str, base_status: str | None, base_sig: str | None,
             pattern: bool = False) -> str:  # fmt: skip
    """The comparison class of one cell. ``pattern``: ``base_sig`` may hold ``*``."""
    if base_status is None:
        return "new"
    if base_status == "pass":
        return "same" if status == "pass" else "regression"
    if status == "pass":
        return "fixed"
    if status != base_status:
        return "changed"
    same_sig = signature_matches(base_sig, sig) if pattern else base_sig == sig
    return "same" if same_sig else "changed"


@dataclass
class Comparison:
    cells: pd.DataFrame  # the run's cells with signature, baseline_* and comparison columns
    missing: pd.DataFrame  # baseline cells the run does not have (a matrix baseline)
    unused: list[Expectation]  # findings that match no cell of the run
    baseline: str  # what the run was compared with, in words

    def counts(self) -> dict[str, int]:
        counts = self.cells.comparison.value_counts()
        return {c: int(counts.get(c, 0)) for c in COMPARISONS}

    def judged_by(self, what: str) -> int:
        return int((self.cells.judged_by == what).sum())

    def failing(self, fail_on_new: bool = False) -> pd.DataFrame:
        bad = self.cells.comparison.isin(FAILING)
        if fail_on_new:
            bad |= (self.cells.comparison == "new") & ~self.cells.status.isin(["pass", "skip"])
        return self.cells[bad]


# One cell's judgment: baseline_status, baseline_signature, baseline_finding, baseline_note,
# judged_by, comparison.
JUDGMENT_COLUMNS = ["baseline_status", "baseline_signature", "baseline_finding", "baseline_note",
                    "judged_by", "comparison"]  # fmt: skip
_NEW = (None, None, "", "", NOT_JUDGED, "new")


def _pipeline_judgment(row: dict, reason: str) -> tuple:
    expected = signature(reason)
    comparison = classify(row["status"], row["signature"], "skip", expected)
    note = f"skipped by design by the pipeline's grid: {reason}"
    return "skip", expected, "", note, BY_PIPELINE, comparison


def _positions(matrix: pd.DataFrame, baseline: pd.DataFrame) -> list[str]:
    """The keys that pair a cell with the baseline's: with their torch releases when both
    matrices hold several version pairs (a cross-version run against a cross-version one),
    else without (a run of one release against a run of another)."""

    def pairs(frame):
        return len(frame[list(VERSION_KEYS)].drop_duplicates())

    return CELL_KEYS if pairs(matrix) > 1 and pairs(baseline) > 1 else POSITION_KEYS


def compare(
    matrix: pd.DataFrame, baseline: Expectations | pd.DataFrame, name: str = ""
) -> Comparison:
    cells = with_default_axes(matrix).copy()
    cells["signature"] = [signature(r) for r in cells.reason]
    if isinstance(baseline, Expectations):
        return _compare_with_expectations(cells, baseline, name)
    return _compare_with_matrix(cells, with_default_axes(baseline), name)


def _compare_with_matrix(cells: pd.DataFrame, baseline: pd.DataFrame, name: str) -> Comparison:
    """compare() with a previous matrix: each cell against the baseline's row of its key."""
    keys = _positions(cells, baseline)
    base = baseline[[*keys, "status", "reason"]].drop_duplicates(keys, keep="last")
    lookup = {
        _key(key): (status, signature(reason))
        for *key, status, reason in base.itertuples(index=False, name=None)
    }
    judged = []
    for row in cells.to_dict("records"):
        if (reason := _by_pipeline(row)) is not None:
            judged.append(_pipeline_judgment(row, reason))
        elif (found := lookup.get(_key(row[k] for k in keys))) is None:
            judged.append(_NEW)
        else:
            status, sig = found
            comparison = classify(row["status"], row["signature"], status, sig)
            judged.append((status, sig, "", "", BY_BASELINE, comparison))
    _set_judgments(cells, judged)
    present = cells[keys].drop_duplicates()
    missing = baseline.merge(present, on=keys, how="left", indicator=True)
    missing = missing[missing._merge == "left_only"].drop(columns="_merge")
    versions = ", ".join(
        sorted(set(baseline.save_torch_version) | set(baseline.load_torch_version))
    )
    return Comparison(
        cells, missing, [], name or f"matrix {len(baseline)} cells (torch {versions})"
    )


def _set_judgments(cells: pd.DataFrame, judged: list[tuple]) -> None:
    for i, col in enumerate(JUDGMENT_COLUMNS):
        cells[col] = pd.Series([j[i] for j in judged], index=cells.index, dtype=object)


def _compare_with_expectations(
    cells: pd.DataFrame, baseline: Expectations, name: str
) -> Comparison:
    """compare() with an expectations file: a measured cell against the first finding that
    matches it (none: it passed)."""
    from pipeline_lib.plan.axes import Variant

    judged = []
    used: set[str] = set()
    for row in cells.to_dict("records"):
        if (reason := _by_pipeline(row)) is not None:
            finding = baseline.finding(row)
            if finding is not None and finding.by_design:  # the file documents the rule
                used.add(finding.id)
            judged.append(_pipeline_judgment(row, reason))
            continue
        variant = Variant(**{axis: row[axis] for axis in AXIS_COLUMNS})
        save, load = layout_key(row, "save"), layout_key(row, "load")
        if not baseline.measured_cell(str(row["model"]), save, load, variant):
            judged.append(_NEW)
            continue
        finding = baseline.finding(row)
        if finding is None:
            status, pattern, finding_id, note = "pass", "", "", ""
        else:
            used.add(finding.id)
            status, pattern = finding.status, finding.signature
            finding_id, note = finding.id, finding.note or finding.why
        comparison = classify(row["status"], row["signature"], status, pattern, pattern=True)
        judged.append((status, pattern, finding_id, note, BY_BASELINE, comparison))
    _set_judgments(cells, judged)
    unused = [f for f in baseline.findings if f.id not in used]
    label = name or f"expectations {baseline.path} (torch {', '.join(baseline.torch)})"
    return Comparison(cells, cells.iloc[0:0], unused, label)


def cell_label(row: dict) -> str:
    """``model save_layout -> load_layout [axis=value ...] (torch s -> l)``: the axes that are
    not the default."""
    from pipeline_lib.plan.axes import DEFAULT

    axes = [f"{a}={row[a]}" for a in AXIS_COLUMNS if row.get(a) != getattr(DEFAULT, a)]
    versions = row.get("save_torch_version"), row.get("load_torch_version")
    torch = versions[0] if versions[0] == versions[1] else f"{versions[0]} -> {versions[1]}"
    extra = f" [{', '.join(axes)}]" if axes else ""
    return f"{row['model']} {row['save_layout']} -> {row['load_layout']}{extra} (torch {torch})"


def verdict_line(comparison: Comparison, failing: int) -> tuple[int, str]:
    """The gate's exit code and its last line. It fails on a failing cell, and when it judged
    nothing: an empty matrix, or a run of which the baseline measured no cell."""
    against = f"against {comparison.baseline}"
    if not len(comparison.cells):
        return 1, f"gate FAILED {against}: the matrix has no cells: nothing was compared"
    if not comparison.judged_by(BY_BASELINE):
        return 1, (
            f"gate FAILED {against}: the baseline measured none of the {len(comparison.cells)} "
            "cell(s) of this run (each is new or a skip by design): nothing was compared"
        )
    counts = ", ".join(f"{n} {c}" for c, n in comparison.counts().items() if n)
    if failing:
        return 1, f"gate FAILED {against}: {counts}"
    return 0, f"gate passed {against}: {counts}"


def gate_lines(comparison: Comparison, fail_on_new: bool = False) -> tuple[int, list[str]]:
    """The gate's exit code and what it prints: one line per failing cell, then the fixed
    cells (announced), then the counts. Every line is made printable (display.line): a reason
    or a name from the results cannot start a line, add one, or hold a terminal escape."""
    lines = []
    failing = comparison.failing(fail_on_new)
    for row in failing.to_dict("records"):
        old = row["baseline_status"] or "(not in baseline)"
        lines.append(
            f"{row['comparison'].upper()}: {cell_label(row)}: {old} -> {row['status']}: "
            f"{row['reason'] or '(no reason)'}"
        )
    for row in comparison.cells[comparison.cells.comparison == "fixed"].to_dict("records"):
        finding = f" (finding {row['baseline_finding']})" if row["baseline_finding"] else ""
        lines.append(f"FIXED: {cell_label(row)}: {row['baseline_status']} -> pass{finding}")
    for finding in comparison.unused:
        lines.append(f"UNUSED: finding {finding.id} matches no cell of this run")
    if len(comparison.missing):
        lines.append(f"MISSING: {len(comparison.missing)} baseline cell(s) are not in this run")
    if new := comparison.counts()["new"]:
        lines.append(f"NEW: {new} cell(s) the baseline did not measure (not judged)")
    if by_design := comparison.judged_by(BY_PIPELINE):
        lines.append(f"BY DESIGN: {by_design} cell(s) judged by the pipeline's own skip rules")
    code, last = verdict_line(comparison, len(failing))
    return code, [display.line(text) for text in [*lines, last]]


def gate(matrix_path: str, baseline_path: str, fail_on_new: bool = False,
         ok_path: str | None = None, out: str | None = None) -> int:  # fmt: skip
    """The CI gate: print the lines, write ``out`` (the comparison as Parquet) and, when it
    passes, ``ok_path``; returns the exit code (2, with one line on stderr, for a matrix or a
    baseline that cannot be read)."""
    import sys

    try:
        comparison = compare(read_matrix(matrix_path), load_baseline(baseline_path))
    except (MatrixFileError, ExpectationsError) as exc:
        print(f"gate: {display.line(exc)}", file=sys.stderr)
        return 2
    code, lines = gate_lines(comparison, fail_on_new)
    print("\n".join(lines))
    if out:
        from pipeline_lib.common.atomic import write_with

        write_with(out, lambda tmp: comparison.cells.to_parquet(tmp))
    if ok_path and code == 0:
        Path(ok_path).write_text(lines[-1] + "\n")
    return code
