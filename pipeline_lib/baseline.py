"""Compare a run with a baseline: reason signatures, a comparison class per cell, the CI gate.

A baseline is either a previous ``matrix.parquet`` or an expectations file (YAML, e.g.
``expectations/torch-2.14.1.yaml``): known findings as cell patterns -> expected status and
reason signature, every other covered cell expected to ``pass``. Pure (pandas, no torch).

Comparison classes (column ``comparison``):

- ``same``: the status and the reason signature the baseline expects;
- ``regression``: the baseline expects ``pass``, the cell does not pass;
- ``fixed``: the baseline expects a non-pass status, the cell passes;
- ``changed``: another non-pass status, or the same status with another reason signature;
- ``new``: the baseline does not cover the cell.

Baseline cells the run does not have are listed apart (``missing``), as are expectations that
match no cell of the run (``unused``): reported, never a gate failure. The gate fails on
``regression`` and ``changed`` (and ``new`` non-pass cells with ``fail_on_new``).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from pipeline_lib.records import AXIS_COLUMNS, CELL_KEYS

COMPARISONS = ("regression", "changed", "fixed", "new", "same")
FAILING = ("regression", "changed")
# Columns an expectation's ``cells`` may match on (every one is a column of matrix.parquet).
PATTERN_COLUMNS = (
    "model",
    "save_layout",
    "load_layout",
    "save_framework",
    "load_framework",
    "save_world_size",
    "load_world_size",
    *AXIS_COLUMNS,
    "save_torch_version",
    "load_torch_version",
)
VERSION_KEYS = ("save_torch_version", "load_torch_version")
# The cell without its torch releases: a run of a new release is compared cell by cell with a
# baseline of an older one.
POSITION_KEYS = [k for k in CELL_KEYS if k not in VERSION_KEYS]

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
    signatures hold brackets and question marks)."""
    regex = ".*".join(re.escape(part) for part in pattern.split("*"))
    return re.fullmatch(regex, sig, flags=re.DOTALL) is not None


# --- expectations -----------------------------------------------------------------------------
@dataclass
class Expectation:
    """One known finding: the cells it covers, what they give, why."""

    id: str
    cells: dict[str, list[str]]
    status: str
    signature: str = "*"
    variant: str = ""  # the findings table's "variant" column (docs/findings.md)
    which: str = ""  # the cells in words: "saved by FSDP1, every model and load layout"
    why: str = ""  # the findings table's "why" column
    note: str = ""
    link: str = ""
    count: int | None = None  # cells of the measured grid
    by_design: bool = False  # a skip or limit of the pipeline, not a finding about torch

    def matches(self, row: dict) -> bool:
        return all(
            any(fnmatch.fnmatchcase(str(row.get(col)), p) for p in pats)
            for col, pats in self.cells.items()
        )


@dataclass
class Expectations:
    """An expectations file: the releases it was measured on, the grid it covers, findings."""

    path: str
    torch: list[str]
    covers: dict[str, list[str]] = field(default_factory=dict)
    findings: list[Expectation] = field(default_factory=list)
    measured: str = ""

    def covered(self, row: dict) -> bool:
        return all(
            any(fnmatch.fnmatchcase(str(row.get(col)), p) for p in pats)
            for col, pats in self.covers.items()
        )

    def expected(self, row: dict) -> tuple[str, str, Expectation | None] | None:
        """(status, signature pattern, finding) for a cell; None if the file does not cover
        it. The first finding that matches wins; a covered cell no finding matches: pass."""
        if not self.covered(row):
            return None
        for finding in self.findings:
            if finding.matches(row):
                return finding.status, finding.signature, finding
        return "pass", "", None


def _patterns(value, where: str) -> dict[str, list[str]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a mapping of column -> pattern(s)")
    out = {}
    for col, pats in value.items():
        if col not in PATTERN_COLUMNS:
            raise ValueError(
                f"{where}.{col}: not a cell column (one of {', '.join(PATTERN_COLUMNS)})"
            )
        out[col] = [str(p) for p in (pats if isinstance(pats, list) else [pats])]
    return out


def load_expectations(path: str | Path) -> Expectations:
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict) or "findings" not in data:
        raise ValueError(f"{path}: an expectations file needs 'torch' and 'findings'")
    torch = data.get("torch", [])
    findings = []
    for i, entry in enumerate(data["findings"]):
        where = f"{path}: findings.{i}"
        unknown = set(entry) - set(Expectation.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}")
        if entry.get("status") not in ("pass", "fail", "error", "crash", "timeout", "skip"):
            raise ValueError(f"{where}.status: {entry.get('status')!r} is not a status")
        findings.append(
            Expectation(**{**entry, "cells": _patterns(entry.get("cells"), f"{where}.cells")})
        )
    ids = [f.id for f in findings]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: finding ids repeat")
    return Expectations(
        path=str(path),
        torch=[str(t) for t in (torch if isinstance(torch, list) else [torch])],
        covers=_patterns(data.get("covers"), f"{path}: covers"),
        findings=findings,
        measured=str(data.get("measured", "")),
    )


def load_baseline(path: str | Path) -> Expectations | pd.DataFrame:
    """An expectations file (.yaml/.yml) or a previous matrix (.parquet)."""
    if str(path).endswith(".parquet"):
        return with_default_axes(pd.read_parquet(path))
    return load_expectations(path)


def with_default_axes(matrix: pd.DataFrame) -> pd.DataFrame:
    """A matrix written before an axis column existed (load_mode) holds its default value."""
    from pipeline_lib.axes import DEFAULT

    missing = {a: getattr(DEFAULT, a) for a in AXIS_COLUMNS if a not in matrix.columns}
    return matrix.assign(**missing) if missing else matrix


# --- comparison -------------------------------------------------------------------------------
@dataclass
class Comparison:
    cells: pd.DataFrame  # the run's cells with signature, baseline_* and comparison columns
    missing: pd.DataFrame  # baseline cells the run does not have (a matrix baseline)
    unused: list[Expectation]  # findings that match no cell of the run
    baseline: str  # what the run was compared with, in words

    def counts(self) -> dict[str, int]:
        counts = self.cells.comparison.value_counts()
        return {c: int(counts.get(c, 0)) for c in COMPARISONS}

    def failing(self, fail_on_new: bool = False) -> pd.DataFrame:
        bad = self.cells.comparison.isin(FAILING)
        if fail_on_new:
            bad |= (self.cells.comparison == "new") & ~self.cells.status.isin(["pass", "skip"])
        return self.cells[bad]


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
    matrix = with_default_axes(matrix)
    cells = matrix.copy()
    cells["signature"] = [signature(r) for r in cells.reason]
    if isinstance(baseline, Expectations):
        return _compare_with_expectations(cells, baseline, name)
    baseline = with_default_axes(baseline)
    keys = _positions(matrix, baseline)
    base = baseline[[*keys, "status", "reason"]].drop_duplicates(keys, keep="last").copy()
    base["baseline_signature"] = [signature(r) for r in base.reason]
    base = base.rename(columns={"status": "baseline_status"}).drop(columns="reason")
    merged = cells.merge(base, on=keys, how="left")
    merged["baseline_status"] = merged.baseline_status.astype(object).where(
        merged.baseline_status.notna(), None
    )
    merged["baseline_finding"] = ""
    merged["baseline_note"] = ""
    merged["comparison"] = [
        classify(s, sig, bs, bsig)
        for s, sig, bs, bsig in zip(merged.status, merged.signature, merged.baseline_status,
                                    merged.baseline_signature, strict=True)
    ]  # fmt: skip
    present = cells[keys].drop_duplicates()
    missing = baseline.merge(present, on=keys, how="left", indicator=True)
    missing = missing[missing._merge == "left_only"].drop(columns="_merge")
    versions = ", ".join(
        sorted(set(baseline.save_torch_version) | set(baseline.load_torch_version))
    )
    return Comparison(
        merged, missing, [], name or f"matrix {len(baseline)} cells (torch {versions})"
    )


def _compare_with_expectations(
    cells: pd.DataFrame, baseline: Expectations, name: str
) -> Comparison:
    """compare() with an expectations file: each cell against the finding it matches."""
    rows = []
    used: set[str] = set()
    for row in cells.to_dict("records"):
        expected = baseline.expected(row)
        if expected is None:
            rows.append((None, None, "", "", "new"))
            continue
        status, pattern, finding = expected
        if finding is not None:
            used.add(finding.id)
        comparison = classify(row["status"], row["signature"], status, pattern, pattern=True)
        rows.append(
            (status, pattern, finding.id if finding else "",
             (finding.note or finding.why) if finding else "", comparison)
        )  # fmt: skip
    cols = ["baseline_status", "baseline_signature", "baseline_finding", "baseline_note"]
    for i, col in enumerate([*cols, "comparison"]):
        cells[col] = [r[i] for r in rows]
    unused = [f for f in baseline.findings if f.id not in used]
    label = name or f"expectations {baseline.path} (torch {', '.join(baseline.torch)})"
    return Comparison(cells, cells.iloc[0:0], unused, label)


def cell_label(row: dict) -> str:
    """``model save_layout -> load_layout [axis=value ...] (torch s -> l)``: the axes that are
    not the default."""
    from pipeline_lib.axes import DEFAULT

    axes = [f"{a}={row[a]}" for a in AXIS_COLUMNS if row.get(a) != getattr(DEFAULT, a)]
    versions = row.get("save_torch_version"), row.get("load_torch_version")
    torch = versions[0] if versions[0] == versions[1] else f"{versions[0]} -> {versions[1]}"
    extra = f" [{', '.join(axes)}]" if axes else ""
    return f"{row['model']} {row['save_layout']} -> {row['load_layout']}{extra} (torch {torch})"


def gate_lines(comparison: Comparison, fail_on_new: bool = False) -> tuple[int, list[str]]:
    """The gate's exit code and what it prints: one line per failing cell, then the fixed
    cells (announced), then the counts."""
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
    counts = ", ".join(f"{n} {c}" for c, n in comparison.counts().items() if n)
    verdict = "FAILED" if len(failing) else "passed"
    lines.append(f"gate {verdict} against {comparison.baseline}: {counts}")
    return (1 if len(failing) else 0), lines


def gate(matrix_path: str, baseline_path: str, fail_on_new: bool = False,
         ok_path: str | None = None, out: str | None = None) -> int:  # fmt: skip
    """The CI gate: print the lines, write ``out`` (the comparison as Parquet) and, when it
    passes, ``ok_path``; returns the exit code."""
    comparison = compare(
        with_default_axes(pd.read_parquet(matrix_path)), load_baseline(baseline_path)
    )
    code, lines = gate_lines(comparison, fail_on_new)
    print("\n".join(lines))
    if out:
        from pipeline_lib.atomic import write_with

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
    str(p) for p in (Path(__file__).resolve().parent.parent / "expectations").glob("torch-*.yaml")
)


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


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
        "gate", help="compare a matrix with a baseline: exit 1 on a regression or change"
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


# --- the report's sections (pipeline_lib.report) ---------------------------------------------
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


def finding_groups(cells: pd.DataFrame, reproducers: str = "results/reproducers") -> list[dict]:
    """Non-pass cells grouped by status and reason signature, problems first, skips last."""
    from pipeline_lib.records import STATUSES
    from pipeline_lib.reproducer import cell_id

    cells = cells.copy()
    if "signature" not in cells:
        cells["signature"] = [signature(r) for r in cells.reason]
    groups = []
    keys = ["status", "signature"] + (["baseline_finding"] if "baseline_finding" in cells else [])
    for key, group in cells[cells.status != "pass"].groupby(keys, sort=False):
        status, sig = key[0], key[1]
        releases = sorted(set(group.save_torch_version) | set(group.load_torch_version))
        first = group.iloc[0].to_dict()
        groups.append(
            {
                "status": status,
                "signature": sig,
                "count": len(group),
                "cells": collapse(group, cells),
                "releases": ", ".join(map(str, releases)),
                "example": str(first["reason"]),
                # An existing checkpoint's cells have none: the checkpoint is the reproducer.
                "reproducer": ""
                if status == "skip" or first.get("save_framework") == "existing"
                else f"{reproducers}/{cell_id(first)}/repro.py",
                "comparison": ", ".join(
                    f"{c} {n}" for c, n in group.comparison.value_counts().items()
                )
                if "comparison" in group
                else "",
            }
        )
    # A status this version does not know (a newer record) sorts last.
    rank = {status: i for i, status in enumerate(STATUSES)}
    groups.sort(key=lambda g: (rank.get(g["status"], len(rank)), -g["count"]))
    return groups


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
    evidence, and how to reproduce the run."""
    comparison = None
    cells = matrix
    if baseline_path:
        result = compare(matrix, load_baseline(baseline_path))
        cells = result.cells
        code, lines = gate_lines(result)
        comparison = {
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
                {
                    "cell": cell_label(r),
                    "old": r["baseline_status"],
                    "finding": r["baseline_finding"],
                }
                for r in result.cells[result.cells.comparison == "fixed"].to_dict("records")
            ],
            "missing": len(result.missing),
            "unused": [f.id for f in result.unused],
            "gate_failed": bool(code),
        }
    return {
        "comparison": comparison,
        "finding_groups": finding_groups(cells),
        "reproduce": {
            "command": command or "(not given: run from the Snakemake rule to record it)",
            "machine": machine(),
            "packages": packages(config),
        },
    }
