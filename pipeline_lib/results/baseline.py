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
            else conflict(variant) or layout_conflict(variant, side, _int(world_size))
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


# --- the findings table (docs/findings.md) ---------------------------------------------------
TABLE_BEGIN = (
    "<!-- findings-table: python -m pipeline_lib findings-table --write docs/findings.md -->"
)
TABLE_END = "<!-- /findings-table -->"
DEFAULT_EXPECTATIONS = sorted(
    str(p) for p in (Path(__file__).resolve().parents[2] / "expectations").glob("torch-*.yaml")
)


def _md(text: str) -> str:
    return display.visible(str(text).replace("|", "\\|").replace("\n", " "))


def findings_table(paths: list[str]) -> str:
    """Markdown: one row per finding id over the files, with the releases whose file has it."""
    files = [load_expectations(p) for p in paths]
    rows: dict[str, tuple[Expectation, list[str]]] = {}
    for exp in files:
        for finding in exp.findings:
            _, releases = rows.setdefault(finding.id, (finding, []))
            releases.extend(exp.torch)
    lines = [
        "| variant | cells | status | which cells | why | torch |",
        "|---|---|---|---|---|---|",
    ]
    for finding, releases in rows.values():
        lines.append(
            f"| `{_md(finding.variant)}` | {finding.count if finding.count is not None else '—'} "
            f"| {finding.status} | {_md(finding.which)} | {_md(finding.why)} "
            f"| {', '.join(dict.fromkeys(releases))} |"
        )
    return "\n".join(lines) + "\n"


def readme_with_table(readme: str, table: str) -> str:
    start, end = readme.index(TABLE_BEGIN) + len(TABLE_BEGIN), readme.index(TABLE_END)
    return readme[:start] + "\n" + table + readme[end:]


# --- commands (registered by pipeline_lib.cli; a handler returns the exit status) ----------
def _cmd_gate(args) -> int:
    return gate(args.matrix, args.baseline, args.fail_on_new, args.ok, args.comparison)


def _cmd_findings_table(args) -> int:
    table = findings_table(args.expectations or DEFAULT_EXPECTATIONS)
    if not args.write:
        print(table, end="")
        return 0
    path = Path(args.write)
    text = readme_with_table(path.read_text(), table)
    if args.check:
        if text != path.read_text():
            print(f"{path}: the findings table differs from the expectations files")
            return 1
        return 0
    path.write_text(text)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser(
        "gate",
        help="compare a matrix with a baseline: exit 1 on a regression or change, or when it "
        "judged no cell; 2 when the matrix or the baseline cannot be read",
    )
    p.add_argument("--matrix", default="results/matrix.parquet")
    p.add_argument(
        "--baseline", required=True, help="an expectations file (.yaml) or a matrix.parquet"
    )
    p.add_argument("--fail-on-new", action="store_true", help="also fail on new non-pass cells")
    p.add_argument("--comparison", help="comparison.parquet to write (every cell, its class)")
    p.add_argument("--ok", help="marker file written when the gate passes")
    p.set_defaults(func=_cmd_gate)
    p = sub.add_parser(
        "findings-table", help="the findings table of docs/findings.md from expectations"
    )
    p.add_argument("expectations", nargs="*", help="default: expectations/torch-*.yaml")
    p.add_argument("--write", help="docs/findings.md: replace the table between its markers")
    p.add_argument("--check", action="store_true", help="with --write: exit 1 if it differs")
    p.set_defaults(func=_cmd_findings_table)


# --- the report's sections (pipeline_lib.results.report) --------------------------------------
SIDE_LABELS = (
    ("save_layout", "saved by", "save layout"),
    ("load_layout", "loaded into", "load layout"),
    ("model", "model", "model"),
)


def collapse(group: pd.DataFrame, matrix: pd.DataFrame) -> str:
    """The cells of ``group`` in words: "saved by fsdp1_2, every load layout, every model,
    mode=full (8 cells)"."""
    parts = []
    for col, label, noun in SIDE_LABELS:
        values = list(dict.fromkeys(group[col]))
        if set(values) == set(matrix[col]) and len(values) > 1:
            parts.append(f"every {noun}")
        else:
            parts.append(f"{label} {', '.join(map(str, values))}")
    for col in AXIS_COLUMNS:
        values = list(dict.fromkeys(group[col]))
        if matrix[col].nunique() > 1 and set(values) != set(matrix[col]):
            parts.append(f"{col}={'/'.join(map(str, values))}")
    n = len(group)
    return f"{', '.join(parts)} ({n} cell{'s' if n != 1 else ''})"


@dataclass(frozen=True)
class FindingGroup:
    """One row of the report's findings: the non-pass cells of one status and reason
    signature, in words (collapse), their torch releases, an example reason, the first cell's
    reproducer ("" for skips and existing checkpoints) and, with a baseline, the comparisons."""

    status: str
    signature: str
    count: int
    cells: str
    releases: str
    example: str
    reproducer: str
    comparison: str


def finding_groups(
    cells: pd.DataFrame, reproducers: str = "results/reproducers"
) -> list[FindingGroup]:
    """Non-pass cells grouped by status and reason signature, problems first, skips last."""
    from pipeline_lib.verify.records import STATUSES

    cells = cells.copy()
    if "signature" not in cells:
        cells["signature"] = [signature(r) for r in cells.reason]
    keys = ["status", "signature"] + (["baseline_finding"] if "baseline_finding" in cells else [])
    groups = [
        _finding_group(key[0], key[1], group, cells, reproducers)
        for key, group in cells[cells.status != "pass"].groupby(keys, sort=False)
    ]
    # A status this version does not know (a newer record) sorts last.
    rank = {status: i for i, status in enumerate(STATUSES)}
    groups.sort(key=lambda g: (rank.get(g.status, len(rank)), -g.count))
    return groups


def _finding_group(
    status: str, sig: str, group: pd.DataFrame, cells: pd.DataFrame, reproducers: str
) -> FindingGroup:
    from pipeline_lib.results.reproducer import cell_id

    releases = sorted(set(group.save_torch_version) | set(group.load_torch_version))
    first = group.iloc[0].to_dict()
    # An existing checkpoint's cells have none: the checkpoint is the reproducer.
    no_reproducer = status == "skip" or first.get("save_framework") == "existing"
    counts = group.comparison.value_counts().items() if "comparison" in group else ()
    return FindingGroup(
        status=status,
        signature=sig,
        count=len(group),
        cells=collapse(group, cells),
        releases=", ".join(map(str, releases)),
        example=str(first["reason"]),
        reproducer="" if no_reproducer else f"{reproducers}/{cell_id(first)}/repro.py",
        comparison=", ".join(f"{c} {n}" for c, n in counts),
    )


def machine() -> list[tuple[str, str]]:
    import os
    import platform
    import shutil
    import subprocess

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    rows = [("CPU", f"{cpu}, {os.cpu_count()} cores"), ("OS", platform.platform())]
    gpus = "none visible"
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10,
            ).stdout.strip()  # fmt: skip
            gpus = "; ".join(out.splitlines()) or gpus
        except (OSError, subprocess.SubprocessError):
            pass
    rows.append(("GPUs (name, driver)", gpus))
    return rows


def packages(config: dict) -> list[tuple[str, str]]:
    """(environment, its exact package list) for the pipeline's and each torch_versions env."""
    from importlib import metadata

    own = sorted(
        {
            f"{d.metadata['Name']}=={d.version}"
            for d in metadata.distributions()
            if d.metadata["Name"]
        },
        key=str.lower,
    )
    import sys

    envs = [(f"pipeline ({sys.prefix})", "\n".join(own))]
    for name in config.get("torch_versions") or {}:
        path = Path(config["run"]["torch_env_dir"]) / name / "packages.txt"
        text = path.read_text().strip() if path.exists() else f"({path} not found)"
        envs.append((f"{name} ({path})", text))
    return envs


def report_context(matrix: pd.DataFrame, config: dict, baseline_path: str | None,
                   command: str | None) -> dict:  # fmt: skip
    """What the report adds for issue 18: the comparison (or None), findings with their
    evidence, and how to reproduce the run. A baseline that cannot be read (config validation
    refuses one before any job; this is the report made by hand) costs the comparison, not
    the report."""
    comparison = None
    cells = matrix
    if baseline_path:
        try:
            result = compare(matrix, load_baseline(baseline_path))
        except (ExpectationsError, MatrixFileError) as exc:
            result = None
            comparison = {"error": str(exc), "gate_failed": True}
        if result is not None:
            cells = result.cells
            comparison = _comparison_section(result)
    return {
        "comparison": comparison,
        "finding_groups": finding_groups(cells),
        "reproduce": {
            "command": command or "(not given: run from the Snakemake rule to record it)",
            "machine": machine(),
            "packages": packages(config),
        },
    }


def _comparison_section(result: Comparison) -> dict:
    code, lines = gate_lines(result)
    return {
        "error": "",
        "baseline": result.baseline,
        "verdict": lines[-1],
        "counts": [(c, n) for c, n in result.counts().items() if n],
        "failing": [
            {
                "cell": cell_label(r),
                "old": r["baseline_status"] or "—",
                "new": r["status"],
                "comparison": r["comparison"],
                "reason": r["reason"],
            }
            for r in result.failing().to_dict("records")
        ],
        "fixed": [
            {"cell": cell_label(r), "old": r["baseline_status"], "finding": r["baseline_finding"]}
            for r in result.cells[result.cells.comparison == "fixed"].to_dict("records")
        ],
        "missing": len(result.missing),
        "unused": [f.id for f in result.unused],
        "gate_failed": bool(code),
    }
