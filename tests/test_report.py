"""The matrix report: report.html and summary.md from a results fixture with every status."""

from __future__ import annotations

import re
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline_lib.cli import main
from pipeline_lib.plan.axes import DEFAULT
from pipeline_lib.plan.config import config_hash, validate
from pipeline_lib.results import report as report_lib
from pipeline_lib.results.report import findings, markdown_cell
from pipeline_lib.verify.records import MATRIX_SCHEMA, STATUSES, TENSORS_SCHEMA
from tests import procs
from tests.conftest import REPO

CONFIG = validate(
    {
        "models": ["mlp", "mlp_uneven"],
        "layouts": {
            "single": {"framework": "single", "mesh": [1]},
            "fsdp2_2": {"framework": "fsdp2", "mesh": [2]},
            "tp_2": {"framework": "tp", "mesh": [2]},
        },
    }
)
LAYOUTS = list(CONFIG["layouts"])
# Per model: rows = save layout, columns = load layout, both in config order.
GRID = {
    "mlp": [
        ["pass", "pass", "fail"],
        ["crash", "crash", "crash"],
        ["error", "timeout", "pass"],
    ],
    "mlp_uneven": [
        ["pass", "fail", "skip"],
        ["crash", "crash", "skip"],
        ["skip", "skip", "skip"],
    ],
}
XSS = "<script>alert(1)</script>"
SKIP_SAVE = "save layout: TP degree 2 does not divide mlp_uneven hidden=25"
SKIP_LOAD = "load layout: TP degree 2 does not divide mlp_uneven hidden=25"
FAIL_REASONS = {
    ("mlp", "single", "tp_2"): "files vs saver: 1 of 3 entries differ; first model.fc.weight: "
    f"bytes differ {XSS}",
    ("mlp_uneven", "single", "fsdp2_2"): "loader vs saver: 1 of 3 entries differ; first "
    "optim.state.fc.weight.exp_avg: bytes differ (max_abs_diff 1e-08); resume: loss differs by "
    "0.01 (relative) at resume step 0, above resume_rtol 1e-05",
}
OTHER_REASONS = {
    "crash": "save: rank 1 killed by SIGKILL during save",
    "error": "load: RuntimeError: size mismatch for fc.weight (during cell tp_2)",
    "timeout": "load: no progress for 20 s during cell tp_2; job killed",
}
ENTRIES = {  # entry -> (kind, the failing cell that finds it different)
    "model.fc.weight": ("param", ("mlp", "single", "tp_2")),
    "optim.state.fc.weight.exp_avg": ("optim.exp_avg", ("mlp_uneven", "single", "fsdp2_2")),
    "optim.state.fc.weight.step": ("optim.step", None),
}


def grid_cells():
    for model, rows in GRID.items():
        for save, statuses in zip(LAYOUTS, rows, strict=True):
            for load, status in zip(LAYOUTS, statuses, strict=True):
                yield model, save, load, status


def reason(model: str, save: str, load: str, status: str) -> str:
    if status == "skip":
        return SKIP_SAVE if save == "tp_2" else SKIP_LOAD
    if status == "fail":
        return FAIL_REASONS[model, save, load]
    return OTHER_REASONS.get(status, "")


def matrix_row(i: int, model: str, save: str, load: str, status: str) -> dict:
    ran = status != "skip"
    layout = {
        name: (spec["framework"], spec["mesh"][0]) for name, spec in CONFIG["layouts"].items()
    }
    return {
        "model": model,
        "save_layout": save,
        "save_framework": layout[save][0],
        "save_mesh": str(layout[save][1]),
        "save_world_size": layout[save][1],
        "load_layout": load,
        "load_framework": layout[load][0],
        "load_mesh": str(layout[load][1]),
        "load_world_size": layout[load][1],
        **DEFAULT.to_dict(),
        "status": status,
        "reason": reason(model, save, load, status),
        "entries_checked": len(ENTRIES) if ran else 0,
        "entries_mismatched": int(status == "fail"),
        "files_entries_mismatched": int((model, save, load) == ("mlp", "single", "tp_2")),
        "load_entries_mismatched": int(
            (model, save) == ("mlp_uneven", "single") and status == "fail"
        ),
        "resume_max_rel_diff": {"pass": 2e-8 * (i % 2), "fail": 0.01}.get(status),
        "save_seconds": 0.1 + 0.01 * i if ran else None,
        "load_seconds": 0.2 + 0.01 * i if ran else None,
        "checkpoint_bytes": 100_000 * layout[save][1] if ran else None,
        "checkpoint_files": layout[save][1] if ran else None,
        "save_peak_rss_mb": 300.0 + i if ran else None,
        "load_peak_rss_mb": 310.0 + i if ran else None,
        "torch_version": "2.13.0+cpu",
        "save_torch_version": "2.13.0+cpu",
        "load_torch_version": "2.13.0+cpu",
        "backend": "gloo",
        "device": "cpu",
        "config_hash": config_hash(CONFIG),
        "git_commit": "0123456789ab",
        "created_at": f"2026-11-23T11:{i:02d}:00+0000",
    }


def tensor_rows(model: str, save: str, load: str, status: str) -> list[dict]:
    if status == "skip":
        return []
    return [
        {
            "model": model,
            "save_layout": save,
            "load_layout": load,
            "save_torch_version": "2.13.0+cpu",
            "load_torch_version": "2.13.0+cpu",
            **DEFAULT.to_dict(),
            "entry": entry,
            "kind": kind,
            "dtype": "float32",
            "shape": [4],
            "equal": differs != (model, save, load),
            "file_equal": True,
            "load_equal": True,
            "max_abs_diff": 0.0,
            "note": "",
        }
        for entry, (kind, differs) in ENTRIES.items()
    ]


def results_tables() -> tuple[pa.Table, pa.Table]:
    cells = list(grid_cells())
    matrix = [matrix_row(i, *cell) for i, cell in enumerate(cells)]
    tensors = [row for cell in cells for row in tensor_rows(*cell)]
    return (
        pa.Table.from_pylist(matrix, schema=MATRIX_SCHEMA),
        pa.Table.from_pylist(tensors, schema=TENSORS_SCHEMA),
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict[str, Path]:
    """The fixture's results, rendered once through the command line."""
    out = tmp_path_factory.mktemp("report")
    matrix, tensors = results_tables()
    paths = {name: out / name for name in ("matrix.parquet", "tensors.parquet", "config.yaml")}
    pq.write_table(matrix, paths["matrix.parquet"])
    pq.write_table(tensors, paths["tensors.parquet"])
    paths["config.yaml"].write_text(yaml.safe_dump(CONFIG, sort_keys=False))
    paths |= {"html": out / "report.html", "markdown": out / "summary.md"}
    main(
        ["report", "--matrix", str(paths["matrix.parquet"]), "--tensors", str(paths["tensors.parquet"]),
         "--configfile", str(paths["config.yaml"]), "--snakemake-version", "9.27.1",
         "--html", str(paths["html"]), "--markdown", str(paths["markdown"])]
    )  # fmt: skip
    return paths


def test_fixture_has_every_status():
    assert {status for *_, status in grid_cells()} == set(STATUSES)


def test_markdown_has_one_row_per_save_layout_per_model(report):
    text = report["markdown"].read_text()
    for model, rows in GRID.items():
        section = text.split(f"### {model}\n", 1)[1].split("\n#", 1)[0]
        table = [line for line in section.splitlines() if line.startswith("|")]
        assert table[0] == "| save ↓ load → | single | fsdp2_2 | tp_2 |"
        assert [line.strip("| ").split(" | ") for line in table[2:]] == [
            [save, *statuses] for save, statuses in zip(LAYOUTS, rows, strict=True)
        ]


def test_markdown_lists_every_non_pass_cell_problems_first(report):
    text = report["markdown"].read_text()
    listed = re.findall(r"^\| (mlp\S*) \| (\S+) \| (\S+) \| (\w+) \| (.*) \|$", text, re.M)
    expected = [(m, s, d, st) for m, s, d, st in grid_cells() if st != "pass"]
    assert sorted(row[:4] for row in listed) == sorted(expected)
    assert [row[3] for row in listed] == sorted((row[3] for row in listed), key=STATUSES.index)
    assert (
        "| mlp | tp_2 | fsdp2_2 | timeout | load: no progress for 20 s during cell tp_2; job killed |"
        in text
    )


def test_findings():
    matrix, tensors = (t.to_pandas() for t in results_tables())
    assert findings(matrix, tensors, CONFIG) == [
        "Every cell saved by framework fsdp2 crashes (5 cells)",
        "Check files vs saver finds a difference in 1 cell",
        "Check loader vs saver finds a difference in 1 cell",
        "Check resume finds a difference in 1 cell",
        "Differing state entries in failing cells, by kind: optim.exp_avg 1, param 1",
        f"3 cells skipped ({SKIP_SAVE})",
        f"2 cells skipped ({SKIP_LOAD})",
        "Largest resume_max_rel_diff among passing cells: 2e-08 (resume_rtol 1e-05)",
    ]


def test_findings_of_a_matrix_that_passes_and_of_stale_rows():
    matrix, tensors = (t.to_pandas() for t in results_tables())
    matrix = matrix[matrix.status == "pass"]
    other_config = {**CONFIG, "verify": {"resume_rtol": 1e-3}}
    assert findings(matrix, tensors, other_config) == [
        "Every cell passes (4 cells)",
        "Largest resume_max_rel_diff among passing cells: 2e-08 (resume_rtol 0.001)",
        f"The config shown (hash {config_hash(other_config)}) is not the one the rows were made"
        f" with ({config_hash(CONFIG)})",
    ]


def test_strings_from_the_results_are_escaped(report):
    html, markdown = report["html"].read_text(), report["markdown"].read_text()
    assert XSS not in html and XSS not in markdown
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in markdown


def test_markdown_cell_keeps_a_table_row_whole():
    assert markdown_cell("a | b\n<c> & d") == "a \\| b &lt;c&gt; &amp; d"


def test_html_is_self_contained(report):
    html = report["html"].read_text()
    assert "<script" not in html.lower()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?[^"'#\s>]""", html), "no external resources"
    assert not re.search(r"url\((?!#)|@import", html)
    assert html.count("<svg") == 4  # time, throughput, size, memory
    assert "<h3>Config</h3>" in html and "resume_rtol: 1.0e-05" in html
    for value in ("2.13.0+cpu", "gloo", "cpu", config_hash(CONFIG), "0123456789ab", "9.27.1"):
        assert f"<td>{value}</td>" in html


class HeatmapCells(HTMLParser):
    """(data-model, data-save, data-load, data-status, text) of every heatmap cell, and the
    tooltip (title) of each."""

    def __init__(self):
        super().__init__()
        self.cells: list[list[str]] = []
        self.titles: dict[tuple[str, ...], str] = {}
        self._open: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "td" and "cell" in (attrs.get("class") or "").split():
            self._open = [attrs[f"data-{k}"] for k in ("model", "save", "load", "status")] + [""]
            self.cells.append(self._open)
            self.titles[tuple(self._open[:3])] = attrs["title"]

    def handle_endtag(self, tag):
        if tag == "td":
            self._open = None

    def handle_data(self, data):
        if self._open is not None:
            self._open[-1] += data.strip()


def test_heatmap_in_headless_chromium(report, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.fail("chromium not found: `bash scripts/setup.sh --dev` installs Debian's chromium")
    screenshot = tmp_path / "report.png"
    proc = procs.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         f"--screenshot={screenshot}", "--window-size=1400,2000", "--dump-dom",
         report["html"].as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    artifact = REPO / "results" / "test-artifacts" / "report-screenshot.png"
    artifact.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(screenshot, artifact)
    assert screenshot.read_bytes().startswith(b"\x89PNG") and screenshot.stat().st_size > 10_000

    parser = HeatmapCells()
    parser.feed(proc.stdout)
    expected = [[m, s, d, st, st] for m, s, d, st in grid_cells()]
    assert parser.cells == expected
    assert parser.titles["mlp", "single", "tp_2"] == (
        "mlp: saved under single (torch 2.13.0+cpu), loaded under tp_2 (torch 2.13.0+cpu)\n"
        "status: fail\n"
        f"reason: {FAIL_REASONS['mlp', 'single', 'tp_2']}\n"
        "resume_max_rel_diff: 0.01\n"
        "save 0.12 s, load 0.22 s"
    )
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in proc.stdout  # still text in the DOM


@pytest.mark.e2e
def test_report_rule_and_snakemake_report(tmp_path):
    """The rule renders from the two Parquet files alone; `snakemake --report` embeds both."""
    matrix, tensors = results_tables()
    (tmp_path / "results").mkdir()
    pq.write_table(matrix, tmp_path / "results" / "matrix.parquet")
    pq.write_table(tensors, tmp_path / "results" / "tensors.parquet")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(CONFIG, sort_keys=False))
    snakemake = [str(Path(sys.executable).parent / "snakemake"), "-s", str(REPO / "Snakefile"),
                 "-d", str(tmp_path), "--cores", "1"]  # fmt: skip
    for args in (
        ["--allowed-rules", "render_report", "--", "results/report.html"],
        ["--report", str(tmp_path / "snakemake-report.html")],
    ):
        proc = procs.run([*snakemake, *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'data-status="timeout"' in (tmp_path / "results" / "report.html").read_text()
    assert "| mlp | tp_2 | fsdp2_2 | timeout |" in (tmp_path / "results" / "summary.md").read_text()
    assert "Adding report.html" in proc.stderr and "Adding summary.md" in proc.stderr


def test_one_heatmap_per_model_and_torch_version_pair():
    rows = [matrix_row(i, "mlp", "single", "single", "pass") for i in range(3)]
    for row, (saved, loaded) in zip(
        rows, [("2.13.0", "2.14.1"), ("2.14.1", "2.13.0"), ("2.13.0", "2.13.0")], strict=True
    ):
        row.update(save_torch_version=saved, load_torch_version=loaded)
    matrix = pd.DataFrame(rows)
    maps = report_lib.heatmaps(matrix, report_lib.Order.of(matrix, CONFIG))
    assert [m["title"] for m in maps] == [
        "mlp: torch 2.13.0 → 2.14.1", "mlp: torch 2.14.1 → 2.13.0", "mlp: torch 2.13.0 → 2.13.0",
    ]  # fmt: skip
    assert all(m["rows"][0][1][0]["status"] == "pass" for m in maps)
    # A single version pair keeps the plain per-model heading.
    assert [
        m["title"] for m in report_lib.heatmaps(matrix[2:], report_lib.Order.of(matrix[2:], CONFIG))
    ] == ["mlp"]


def test_row_dicts_are_to_dict_records():
    matrix = results_tables()[0].to_pandas()
    # repr: NaN == NaN there (missing_entries is null in every row, a float NaN in both).
    assert repr(report_lib.row_dicts(matrix)) == repr(matrix.to_dict("records"))


def test_nice_ticks():
    assert report_lib.nice_ticks(0.22) == [0.0, 0.05, 0.1, 0.15, 0.2, 0.25]
    assert report_lib.nice_ticks(1.6) == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert report_lib.nice_ticks(3000.0) == [0.0, 1000.0, 2000.0, 3000.0]
    assert report_lib.nice_ticks(float("nan")) == report_lib.nice_ticks(0.0) == [0.0, 1.0]


def test_bar_chart_has_one_bar_per_value_with_its_tooltip():
    table = pd.DataFrame(
        {"mlp": [0.5, 2.0], XSS: [1.0, float("nan")]}, index=pd.Index(["single", "tp_2"])
    )
    svg = str(report_lib.bar_chart([(table, "seconds", "save")], {"mlp": "#111", XSS: "#222"}))
    titles = re.findall(r"<rect [^>]*><title>([^<]*)</title></rect>", svg)
    assert titles == [
        "mlp under single: 0.5 seconds",
        "&lt;script&gt;alert(1)&lt;/script&gt; under single: 1 seconds",
        "mlp under tp_2: 2 seconds",  # the missing value has no bar
    ]
    assert XSS not in svg and svg.count("<svg") == 1
    heights = [float(h) for h in re.findall(r'<rect [^>]*height="([\d.]+)" fill="#', svg)]
    # The y axis ends at 2 (nice_ticks): the 2-second bar is the whole plot's height.
    assert heights[:3] == [pytest.approx(h * report_lib.PLOT_HEIGHT_PX) for h in (0.25, 0.5, 1)]


# --- text from the results and the environments, printed safely --------------------------------
def _render(tmp_path, matrix: pd.DataFrame, config: dict, baseline: str | None = None) -> dict:
    """report.html and summary.md of ``matrix`` (tensors of the fixture)."""
    _, tensors = results_tables()
    paths = {"matrix": tmp_path / "matrix.parquet", "tensors": tmp_path / "tensors.parquet",
             "html": tmp_path / "report.html", "markdown": tmp_path / "summary.md"}  # fmt: skip
    pq.write_table(pa.Table.from_pandas(matrix, schema=MATRIX_SCHEMA, preserve_index=False),
                   paths["matrix"])  # fmt: skip
    pq.write_table(tensors, paths["tensors"])
    report_lib.write_report(str(paths["matrix"]), str(paths["tensors"]), config,
                            str(paths["html"]), str(paths["markdown"]), baseline=baseline)  # fmt: skip
    return {name: path.read_text() for name, path in paths.items() if name in ("html", "markdown")}


def test_a_package_list_with_backticks_stays_inside_its_fence(tmp_path):
    """summary.md shows each environment's packages.txt in a code fence: a line of backticks in
    the file cannot close the fence early (the fence is longer than any backtick run in it)."""
    from markdown_it import MarkdownIt

    envs = tmp_path / "envs"
    (envs / "t2").mkdir(parents=True)
    listed = "torch==2.13.0\n````\n# Injected heading\n::error title=x::y\nzz==1"
    (envs / "t2" / "packages.txt").write_text(listed)
    cfg = validate({**CONFIG, "torch_versions": {"t2": "torch==2.13.0"},
                    "run": {"torch_env_dir": str(envs)}})  # fmt: skip
    markdown = _render(tmp_path, results_tables()[0].to_pandas(), cfg)["markdown"]
    blocks = [t for t in MarkdownIt().parse(markdown) if t.type == "fence"]
    assert any(b.content == listed.replace("::error", "%3A%3Aerror") + "\n" for b in blocks)
    headings = [t.content for t in MarkdownIt().parse(markdown) if t.type == "inline"]
    assert "Injected heading" not in headings
    assert not any(line.lstrip().startswith("::") for line in markdown.splitlines())


def test_control_characters_from_the_results_are_shown_not_sent(tmp_path):
    """A reason with a newline, a terminal escape and a workflow command: summary.md and
    report.html show the escapes as text; no line of summary.md starts with ``::``."""
    matrix = results_tables()[0].to_pandas()
    hostile = "load: x\n::error title=a::b\r\x1b[31mred\x1b[0m \u202eevil"
    matrix.loc[matrix.status == "error", "reason"] = hostile
    out = _render(tmp_path, matrix, CONFIG)
    for text in out.values():
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f\u202e]", text), repr(text)
    assert "\\x0d\\x1b\\[31mred\\x1b\\[0m \\u202eevil" in out["markdown"]  # [ escaped: md
    assert not any(line.lstrip().startswith("::") for line in out["markdown"].splitlines())


def test_a_baseline_that_cannot_be_read_costs_the_comparison_not_the_report(tmp_path):
    (tmp_path / "bad.yaml").write_text("torch: '2.13.0'\nfindings: 5\n")
    out = _render(tmp_path, results_tables()[0].to_pandas(), CONFIG, str(tmp_path / "bad.yaml"))
    for text in out.values():
        assert "The baseline could not be read:" in text and "bad.yaml" in text
