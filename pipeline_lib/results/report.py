"""The matrix report: matrix.parquet + tensors.parquet -> report.html and summary.md.

Reads the results only, never runs a job. HTML is rendered by Jinja2 with autoescape, so every
string taken from the results is escaped; the charts are SVG drawn here (matplotlib took seconds
per chart at 10,000 cells) and inlined in the page, and there is no JavaScript: report.html
opens from disk with no network.

    python -m pipeline_lib report --matrix results/matrix.parquet --tensors results/tensors.parquet
        --configfile config.yaml --html results/report.html --markdown results/summary.md
"""

from __future__ import annotations

import math
import platform
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd
import yaml
from markupsafe import Markup, escape

from pipeline_lib.common import timestamps
from pipeline_lib.common.atomic import write_with
from pipeline_lib.plan import grid
from pipeline_lib.plan.expectations import ExpectationsError, load_baseline
from pipeline_lib.plan.matrix_file import MatrixFileError
from pipeline_lib.plan.schema import config_hash
from pipeline_lib.results import display
from pipeline_lib.results.baseline import Comparison, cell_label, compare, gate_lines, signature
from pipeline_lib.verify.records import AXIS_COLUMNS, CELL_KEYS, STATUSES

TEMPLATES = Path(__file__).resolve().parent / "templates"
# The check names records.verdict puts at the start of each part of a `fail` reason (checks 0
# and 1 of a save sequence's checkpoints end in " at step <n>").
CHECKS = ("state dict vs live", "files vs saver", "save sequence", "loader vs saver", "resume")
# Skipped cells are left out of the shared-status findings: they are counted by reason.
STATUS_VERBS = {
    "pass": "passes",
    "fail": "fails",
    "error": "errors",
    "crash": "crashes",
    "timeout": "times out",
}
SIDE_VERBS = {"save": "saved", "load": "loaded"}


def _verb(status: str) -> str:
    """A status as a verb; one this report does not know (a newer record) as is."""
    return STATUS_VERBS.get(status, f"has status {status}")


def _status_rank(status: str) -> int:
    """Known statuses in their order, any other after them (before skip would hide it)."""
    return STATUSES.index(status) if status in STATUSES else len(STATUSES)


@dataclass(frozen=True)
class Order:
    """Models and layouts in config order (then any the results name that the config does not)."""

    models: list[str]
    save_layouts: list[str]
    load_layouts: list[str]

    @classmethod
    def of(cls, matrix: pd.DataFrame, config: dict) -> Order:
        def merged(first: list[str], then: pd.Series) -> list[str]:
            return list(dict.fromkeys([*first, *then]))

        return cls(
            merged(config["models"], matrix.model),
            merged(grid.save_layouts(config), matrix.save_layout),
            merged(grid.load_layouts(config), matrix.load_layout),
        )

    def sort(self, matrix: pd.DataFrame) -> pd.DataFrame:
        ranks = {
            "model": self.models,
            "save_layout": self.save_layouts,
            "load_layout": self.load_layouts,
        }
        return matrix.sort_values(
            list(ranks), key=lambda col: col.map({n: i for i, n in enumerate(ranks[col.name])})
        )


@dataclass(frozen=True)
class Chart:
    title: str
    caption: str
    svg: Markup


def fmt(value: Any, spec: str = ".3g") -> str:
    """A number for the page; missing values (None, NaN) as an em dash."""
    return "—" if pd.isna(value) else format(value, spec)


def _count(n: int, noun: str = "cell") -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def tooltip(cell: dict) -> str:
    lines = [
        f"{cell['model']}: saved under {cell['save_layout']} (torch {cell['save_torch_version']}),"
        f" loaded under {cell['load_layout']} (torch {cell['load_torch_version']})",
        f"status: {cell['status']}",
    ]
    if cell["reason"]:
        lines.append(f"reason: {cell['reason']}")
    lines += [
        f"resume_max_rel_diff: {fmt(cell['resume_max_rel_diff'])}",
        f"save {fmt(cell['save_seconds'])} s, load {fmt(cell['load_seconds'])} s",
    ]
    return "\n".join(lines)


# Beyond model and layouts, what makes a heatmap: torch version pair and the axes' values.
GROUP_KEYS = ["save_torch_version", "load_torch_version", *AXIS_COLUMNS]


def group_title(group: dict, varying: list[str]) -> str:
    """The parts of a heatmap's group that differ between groups ('' if nothing does)."""
    parts = []
    if {"save_torch_version", "load_torch_version"} & set(varying):
        parts.append(f"torch {group['save_torch_version']} → {group['load_torch_version']}")
    parts += [f"{key}={group[key]}" for key in AXIS_COLUMNS if key in varying]
    return ", ".join(parts)


def row_dicts(frame: pd.DataFrame) -> list[dict]:
    """``frame.to_dict("records")``, the same values, built column by column: to_dict reads
    pyarrow-backed strings one element at a time (0.7 s for a 10,000-cell matrix)."""
    columns = list(frame.columns)
    values = zip(*(frame[c].tolist() for c in columns), strict=True)
    return [dict(zip(columns, row, strict=True)) for row in values]


def heatmaps(matrix: pd.DataFrame, order: Order) -> list[dict]:
    """Per model (and per torch version pair and axis values, when the matrix has several):
    rows of (save layout, [cell or None per load layout]); None = not in pairs."""
    records = row_dicts(matrix)
    cells = {
        (c["model"], *(c[k] for k in GROUP_KEYS), c["save_layout"], c["load_layout"]): {
            **c,
            "tooltip": tooltip(c),
        }
        for c in records
    }
    groups = list(dict.fromkeys(tuple(c[k] for k in GROUP_KEYS) for c in records))
    varying = [k for i, k in enumerate(GROUP_KEYS) if len({g[i] for g in groups}) > 1]
    maps = []
    for model in order.models:
        for group in groups:
            if not any(key[: 1 + len(group)] == (model, *group) for key in cells):
                continue
            title = group_title(dict(zip(GROUP_KEYS, group, strict=True)), varying)
            rows = [
                (save, [cells.get((model, *group, save, load)) for load in order.load_layouts])
                for save in order.save_layouts
            ]
            maps.append(
                {
                    "model": model,
                    "title": f"{model}: {title}" if title else model,
                    "anchor": re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{model}-{title}").strip("-"),
                    "rows": rows,
                }
            )
    return maps


def layout_titles(matrix: pd.DataFrame) -> dict[str, str]:
    """Layout name -> "framework fsdp2, mesh 4" (header tooltips)."""
    titles = {}
    for side in SIDE_VERBS:
        columns = [f"{side}_layout", f"{side}_framework", f"{side}_mesh"]
        # Each distinct row once, at its last place: the last row naming a layout still wins.
        distinct = matrix[columns].drop_duplicates(keep="last")
        for name, framework, mesh in distinct.itertuples(index=False):
            titles[name] = f"framework {framework}, mesh {mesh}"
    return titles


def status_counts(matrix: pd.DataFrame) -> list[tuple[str, int]]:
    """(status, cells) in STATUSES order, then the statuses this report does not know."""
    counts = matrix.status.value_counts()
    unknown = sorted(s for s in counts.index if s not in STATUSES)
    return [(s, int(counts[s])) for s in [*STATUSES, *unknown] if s in counts]


def findings(matrix: pd.DataFrame, tensors: pd.DataFrame, config: dict) -> list[str]:
    """Short statements computed from the results, most general first."""
    ran = matrix[matrix.status != "skip"]
    found = _status_findings(ran, skipped=len(matrix) - len(ran))
    unknown = matrix[~matrix.status.isin(STATUSES)].status.value_counts()
    for status, n in sorted(unknown.items()):
        found.append(f"{_count(n)} with status {status}, which this report does not know")
    failed = matrix[matrix.status == "fail"]
    for check in CHECKS:
        pattern = rf"(?:^|; ){re.escape(check)}(?: at step \d+)?:"
        n = int(failed.reason.str.contains(pattern).sum())
        if n:
            found.append(f"Check {check} finds a difference in {_count(n)}")
    # equal is None where a check did not run: only False is a difference.
    differing = tensors[tensors.equal.eq(False)].merge(failed[CELL_KEYS])
    if len(differing):
        kinds = differing.kind.fillna("unknown").value_counts()
        kinds = sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0]))
        found.append(
            "Differing state entries in failing cells, by kind: "
            + ", ".join(f"{kind} {n}" for kind, n in kinds)
        )
    skips = matrix[matrix.status == "skip"].reason.value_counts()
    for reason, n in sorted(skips.items(), key=lambda kv: (-kv[1], kv[0])):
        found.append(f"{_count(n)} skipped ({reason})")
    resume = matrix[matrix.status == "pass"].resume_max_rel_diff.dropna()
    if len(resume):
        found.append(
            f"Largest resume_max_rel_diff among passing cells: {resume.max():.3g}"
            f" (resume_rtol {config['verify']['resume_rtol']:g})"
        )
    hashes = sorted(matrix.config_hash.dropna().unique())
    if len(hashes) > 1:
        found.append(f"The rows come from {len(hashes)} configs (hashes {', '.join(hashes)})")
    if hashes and config_hash(config) not in hashes:
        found.append(
            f"The config shown (hash {config_hash(config)}) is not the one the rows were made"
            f" with ({', '.join(hashes)})"
        )
    return found


def _status_findings(ran: pd.DataFrame, skipped: int) -> list[str]:
    """The statuses shared by whole groups of the cells that ran (``skipped``: how many did
    not), as findings."""
    found = []
    # A status shared by a whole group of cells is one finding; a group inside a group already
    # reported is not repeated (an FSDP2 save crash is not listed again per model).
    statuses = set(ran.status)
    if len(statuses) == 1:
        (status,) = statuses
        more = f"; {skipped} more skipped" if skipped else ""
        found.append(f"Every cell {_verb(status)} ({_count(len(ran))}{more})")
    else:
        covered: set = set()
        # Axes with several values: a status shared by one value (everywhere, or under one
        # framework) is a finding of its own, e.g. every mode=full cell saved by FSDP1 crashes.
        axes = [a for a in AXIS_COLUMNS if ran[a].nunique() > 1]
        groupings = [([a], f"with {a}={{}}") for a in axes]
        for side, verb in SIDE_VERBS.items():
            groupings += [([a, f"{side}_framework"], f"with {a}={{}} {verb} by framework {{}}")
                          for a in axes]  # fmt: skip
            groupings += [
                ([f"{side}_framework"], f"{verb} by framework {{}}"),
                ([f"{side}_layout"], f"{verb} under {{}}"),
                (["model", f"{side}_layout"], f"{verb} under {{1}} ({{0}})"),
            ]
        for keys, what in groupings:
            for key, group in ran.groupby(keys, sort=False):
                statuses = set(group.status)
                if statuses == {"pass"} or len(statuses) > 1 or len(group) < 2:
                    continue
                if set(group.index) <= covered:
                    continue
                covered |= set(group.index)
                found.append(
                    f"Every cell {what.format(*key)} {_verb(group.status.iloc[0])}"
                    f" ({_count(len(group))})"
                )
    return found


# One colour per model in config order: matplotlib's "tab10" cycle.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")  # fmt: skip
# Chart geometry in SVG pixels. Text is not measured: a character is taken as CHAR_EM font sizes
# wide, a little over the average of a sans-serif font, so the margins err on the wide side.
FONT_PX, CHAR_EM, TICK_PX = 11, 0.6, 4
PLOT_HEIGHT_PX, MIN_PLOT_WIDTH_PX, MIN_SLOT_PX, PANEL_GAP_PX = 220, 320, 16, 24
BAR_FILL = 0.8  # of a layout's slot; the rest is the gap between layouts
# The layout names under the bars slant down to the left, at this angle.
LABEL_DEGREES = 45
LABEL_SIN, LABEL_COS = math.sin(math.radians(LABEL_DEGREES)), math.cos(math.radians(LABEL_DEGREES))
TITLE_PX = 2 * FONT_PX  # above the plots


def nice_ticks(top: float) -> list[float]:
    """0 up to at least ``top`` in about five steps of 1, 2, 2.5 or 5 x 10^k."""
    if not top > 0:  # no bars, or zeros only
        return [0.0, 1.0]
    magnitude = 10 ** math.floor(math.log10(top / 5))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= top / 5)
    # round(): 3 x 0.1 would be labelled 0.30000000000000004.
    return [round(i * step, 12) for i in range(math.ceil(top / step - 1e-9) + 1)]


def _text_px(text: str) -> float:
    return len(text) * CHAR_EM * FONT_PX


def _text(x: float, y: float, text: str, **attrs: Any) -> str:
    """A <text> element; ``attrs`` (ours, not from the results) with _ for -."""
    extra = "".join(f' {name.replace("_", "-")}="{value}"' for name, value in attrs.items())
    return f'<text x="{x:.1f}" y="{y:.1f}"{extra}>{escape(text)}</text>'


def _line(x: float, y: float, path: str, colour: str = "#333") -> str:
    return f'<path d="M{x:.1f} {y:.1f}{path}" stroke="{colour}"/>'


def _panel(
    table: pd.DataFrame, unit: str, title: str, colours: dict[str, str], x: float
) -> tuple[list[str], float]:
    """The SVG elements of one panel starting at ``x``, and where it ends: one bar per model
    (columns) in each layout (index) group, y axis from 0. One drawing from top to bottom: its
    steps share the panel's coordinates, so it stays one function."""
    ticks = nice_ticks(table.max().max())
    tick_labels = [f"{t:g}" for t in ticks]
    width = max(MIN_PLOT_WIDTH_PX, MIN_SLOT_PX * len(table.index))
    slot = width / max(len(table.index), 1)
    # Room for the unit, the tick labels and the first layout name, which slants to the left.
    axis_px = 1.6 * FONT_PX + TICK_PX + 2 + max(map(_text_px, tick_labels))
    first_px = _text_px(str(table.index[0])) * LABEL_COS - slot / 2 if len(table.index) else 0
    left, bottom = x + max(axis_px, first_px), TITLE_PX + PLOT_HEIGHT_PX
    scale = PLOT_HEIGHT_PX / ticks[-1]
    parts = [
        _text(left + width / 2, TITLE_PX - 0.7 * FONT_PX, title, text_anchor="middle",
              font_size=FONT_PX + 1),
        _text(x + FONT_PX, TITLE_PX + PLOT_HEIGHT_PX / 2, unit, text_anchor="middle",
              transform=f"rotate(-90 {x + FONT_PX:.1f} {TITLE_PX + PLOT_HEIGHT_PX / 2:.1f})"),
    ]  # fmt: skip
    for tick, label in zip(ticks, tick_labels, strict=True):
        y = bottom - tick * scale
        parts += [
            _line(left, y, f"H{left + width:.1f}", "#e3e3e3"),  # grid line
            _line(left - TICK_PX, y, f"h{TICK_PX}"),
            _text(left - TICK_PX - 2, y + 0.35 * FONT_PX, label, text_anchor="end"),
        ]
    bar = slot * BAR_FILL / max(len(table.columns), 1)
    values = table.to_numpy(dtype=float, na_value=math.nan)
    for i, layout in enumerate(table.index):
        centre = left + (i + 0.5) * slot
        for j, model in enumerate(table.columns):
            value = values[i, j]
            if math.isnan(value):  # no cell of this model under this layout
                continue
            parts.append(
                f'<rect x="{centre + (j - len(table.columns) / 2) * bar:.2f}" '
                f'y="{bottom - value * scale:.2f}" width="{bar:.2f}" '
                f'height="{value * scale:.2f}" fill="{colours[model]}">'
                f"<title>{escape(model)} under {escape(layout)}: {fmt(value)} "
                f"{escape(unit)}</title></rect>"
            )
        label_y = bottom + TICK_PX + FONT_PX
        parts += [
            _line(centre, bottom, f"v{TICK_PX}"),
            _text(centre + 0.35 * FONT_PX, label_y, str(layout), text_anchor="end",
                  transform=f"rotate(-{LABEL_DEGREES} {centre:.1f} {label_y:.1f})"),
        ]  # fmt: skip
    parts.append(
        f'<rect x="{left:.1f}" y="{TITLE_PX}" width="{width:.1f}" height="{PLOT_HEIGHT_PX}" '
        'fill="none" stroke="#333"/>'
    )
    return parts, left + width


def _legend(models: list[str], colours: dict[str, str], x: float) -> tuple[list[str], float]:
    """The legend's SVG elements, starting at ``x``, and where it ends."""
    row = 1.5 * FONT_PX
    width = 3 * FONT_PX + max(map(_text_px, ["model", *models]))  # swatch and margins
    parts = [
        f'<rect x="{x:.1f}" y="{TITLE_PX}" width="{width:.1f}" '
        f'height="{(len(models) + 1.5) * row:.1f}" fill="#fff" stroke="#ccc"/>',
        _text(x + width / 2, TITLE_PX + row, "model", text_anchor="middle"),
    ]
    for k, model in enumerate(models):
        y = TITLE_PX + (k + 1.6) * row
        parts += [
            f'<rect x="{x + 0.5 * FONT_PX:.1f}" y="{y:.1f}" width="{FONT_PX}" '
            f'height="{0.7 * FONT_PX:.1f}" fill="{colours[model]}"/>',
            _text(x + 2 * FONT_PX, y + 0.7 * FONT_PX, model),
        ]
    return parts, x + width + 1  # + its right border


def bar_chart(panels: list[tuple[pd.DataFrame, str, str]], colours: dict[str, str]) -> Markup:
    """Inline SVG: the panels (table, unit, title) side by side, then one legend for all (a
    model has the same colour in each). Hover a bar for its model, layout and value."""
    parts, x = [], 0.0
    for table, unit, title in panels:
        elements, right = _panel(table, unit, title, colours, x)
        parts += elements
        x = right + PANEL_GAP_PX
    # The models of any panel, in config (column) order.
    models = list(dict.fromkeys(m for table, *_ in panels for m in table.columns))
    if models:
        elements, x = _legend(models, colours, x)
        parts += elements
    names = [str(name) for table, *_ in panels for name in table.index]
    label_px = max(map(_text_px, names), default=0) * LABEL_SIN + FONT_PX * LABEL_COS
    height = TITLE_PX + PLOT_HEIGHT_PX + 2 * TICK_PX + FONT_PX + label_px
    return Markup(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{x:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {x:.0f} {height:.0f}" font-family="system-ui, sans-serif" '
        f'font-size="{FONT_PX}" fill="#222">{"".join(parts)}</svg>'
    )


def cost_charts(matrix: pd.DataFrame, order: Order) -> list[Chart]:
    """The cost charts (time, throughput, size, memory), in page order. Long for a reason: most
    of it is the list of chart definitions (title, caption, panels), which reads best whole."""
    ran = matrix[matrix.status != "skip"]
    colours = {model: PALETTE[i % len(PALETTE)] for i, model in enumerate(order.models)}
    # Save figures repeat in every cell of a checkpoint: one value per (model, save layout).
    saves = ran.groupby(["model", "save_layout"], sort=False).first().reset_index()
    saves["throughput_mb_s"] = saves.checkpoint_bytes / 1e6 / saves.save_seconds
    saves["checkpoint_mb"] = saves.checkpoint_bytes / 1e6
    loads = ran.groupby(["model", "load_layout"], sort=False).agg(
        load_seconds=("load_seconds", "median"), load_peak_rss_mb=("load_peak_rss_mb", "max")
    )
    loads = loads.reset_index()

    def per_layout(frame: pd.DataFrame, side: str, column: str) -> pd.DataFrame:
        layouts = order.save_layouts if side == "save" else order.load_layouts
        return frame.pivot(index=f"{side}_layout", columns="model", values=column).reindex(
            index=layouts, columns=[m for m in order.models if m in set(frame.model)]
        )

    specs = [
        (
            "Save and load time",
            "dcp.save per save layout; dcp.load + set_state_dict per load layout (median over"
            " the checkpoints it loaded).",
            [
                (per_layout(saves, "save", "save_seconds"), "seconds", "save (by save layout)"),
                (per_layout(loads, "load", "load_seconds"), "seconds", "load (by load layout)"),
            ],
        ),
        (
            "Save throughput",
            "checkpoint_bytes / save_seconds per save layout.",
            [(per_layout(saves, "save", "throughput_mb_s"), "MB/s", "save throughput")],
        ),
        (
            "Checkpoint size",
            "Bytes and files of the checkpoint directory per save layout.",
            [
                (per_layout(saves, "save", "checkpoint_mb"), "MB", "checkpoint size"),
                (per_layout(saves, "save", "checkpoint_files"), "files", "checkpoint files"),
            ],
        ),
        (
            "Peak memory",
            "Peak resident memory of the busiest rank: save job per save layout; load job per"
            " load layout (largest over its cells).",
            [
                (per_layout(saves, "save", "save_peak_rss_mb"), "MB", "save (by save layout)"),
                (per_layout(loads, "load", "load_peak_rss_mb"), "MB", "load (by load layout)"),
            ],
        ),
    ]
    return [Chart(title, caption, bar_chart(panels, colours)) for title, caption, panels in specs]


def _values(matrix: pd.DataFrame, column: str) -> str:
    return ", ".join(map(str, matrix[column].dropna().unique())) or "—"


def environment(matrix: pd.DataFrame, snakemake_version: str | None) -> list[tuple[str, str, str]]:
    """(what, value, where the value comes from) for the environment block."""
    created = matrix.created_at.dropna()
    rows = [
        ("torch", _values(matrix, "torch_version"), "matrix rows (torch_version)"),
        ("backend", _values(matrix, "backend"), "matrix rows"),
        ("device", _values(matrix, "device"), "matrix rows"),
        ("config hash", _values(matrix, "config_hash"), "matrix rows"),
        ("git commit", _values(matrix, "git_commit"), "matrix rows"),
        (
            "records created",
            f"{created.min()} … {created.max()}" if len(created) else "—",
            "matrix rows (created_at, first … last)",
        ),
        ("report generated", timestamps.now(), "report process"),
        ("Python", platform.python_version(), "report process"),
    ]
    if snakemake_version:
        rows.append(("snakemake", snakemake_version, "the Snakemake running the workflow"))
    else:
        rows.append(("snakemake", metadata.version("snakemake"), "installed beside the report"))
    return rows


def breakable(name: str) -> Markup:
    """A layout name that may wrap after its underscores (narrow heatmap columns)."""
    return escape(name).replace("_", Markup("_<wbr>"))


def markdown_cell(value: Any) -> str:
    """A table cell for summary.md: HTML-escaped (Markdown renders raw HTML), one line, no |,
    no link or image (backslash and brackets escaped: ``[x](javascript:...)`` stays text). Its
    other control characters are made visible with every printed value (``_visible``)."""
    text = str(escape(str(value))).replace("\\", "\\\\")
    for char in "[]|":
        text = text.replace(char, "\\" + char)
    return text.replace("\n", " ")


def _visible(value: Any) -> Any:
    """Every value a template prints: a string from the results with its control characters
    visible (newlines and tabs kept: the config block has lines); markup made here (the charts)
    and numbers as they are."""
    if isinstance(value, str) and not isinstance(value, Markup):
        return display.visible(value, keep="\n\t")
    return value


def context(
    matrix: pd.DataFrame, tensors: pd.DataFrame, config: dict, snakemake_version: str | None
) -> dict:
    order = Order.of(matrix, config)
    matrix = order.sort(matrix)
    return {
        "order": order,
        "total": len(matrix),
        "counts": status_counts(matrix),
        "statuses": STATUSES,
        "findings": findings(matrix, tensors, config),
        "heatmaps": heatmaps(matrix, order),
        "layout_titles": layout_titles(matrix),
        # Problems first: the non-pass list in status order (skips last), then grid order.
        "non_pass": matrix[matrix.status != "pass"]
        .sort_values("status", key=lambda s: s.map(_status_rank), kind="stable")
        .pipe(row_dicts),
        "charts": cost_charts(matrix, order),
        "environment": environment(matrix, snakemake_version),
        "config_yaml": yaml.safe_dump(config, sort_keys=False, default_flow_style=None),
    }


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        finalize=_visible,
    )
    env.filters.update(fmt=fmt, md=markdown_cell, breakable=breakable, fence=display.fence,
                       block=display.lines)  # fmt: skip
    return env


def write_report(
    matrix_path: str,
    tensors_path: str,
    config: dict,
    html_path: str,
    markdown_path: str,
    snakemake_version: str | None = None,
    baseline: str | None = None,
    command: str | None = None,
) -> None:
    from pipeline_lib.results.aggregate import results_token

    results_token(matrix_path, tensors_path)  # both files from one aggregate run
    matrix = pd.read_parquet(matrix_path)
    # The report reads only the differing entries (findings), a few of a million rows.
    tensors = pd.read_parquet(
        tensors_path, columns=[*CELL_KEYS, "kind", "equal"], filters=[("equal", "==", False)]
    )
    ctx = context(matrix, tensors, config, snakemake_version)
    ctx.update(report_context(matrix, config, baseline, command))
    env = _templates()
    for path, template in ((html_path, "report.html"), (markdown_path, "summary.md")):
        text = env.get_template(template).render(ctx)
        write_with(path, lambda tmp, text=text: tmp.write_text(text))


# --- the comparison with a baseline, the findings and how to reproduce the run ------------------
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
    """The report's comparison with a baseline (or None), its findings with their evidence,
    and how to reproduce the run. A baseline that cannot be read (config validation
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
