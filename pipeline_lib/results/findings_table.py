"""docs/findings.md's table, generated from the expectations files (``python -m pipeline_lib
findings-table --write docs/findings.md``): one row per finding id, with the releases whose
file has it."""

from __future__ import annotations

from pathlib import Path

from pipeline_lib.common import doc_tables
from pipeline_lib.plan.expectations import Expectation, load_expectations
from pipeline_lib.results import display

NAME = "findings-table"
# The shipped expectations files, one per torch release.
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


def write(paths: list[str], page: str | None, check: bool = False) -> int:
    """Print the table of ``paths`` (default: the shipped files), or write it into ``page``
    between its markers (``check``: exit status 1 if it differs). The exit status."""
    return doc_tables.write(NAME, page, findings_table(paths or DEFAULT_EXPECTATIONS), check)
