"""The fault campaign's verdict: did the verifier give every injected fault its expected status?

A fault that yields ``pass`` (or any status other than the expected one) is a bug in the
verifier: ``check`` says so loudly and fails the run, after ``summarize`` kept the table.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline_lib.common.atomic import read_json, write_text, write_with

COLUMNS = [
    "fault", "model", "save_layout", "load_layout", "reference_mode", "expected", "status",
    "caught", "reason",
]  # fmt: skip


def summarize(record_paths: list[str], table_path: str, markdown_path: str) -> None:
    rows = []
    for path in record_paths:
        record = read_json(path)
        fault, (cell,) = record["fault"], record["cells"]
        rows.append(
            {
                "fault": fault["name"],
                "model": cell["model"],
                "save_layout": cell["save_layout"],
                "load_layout": cell["load_layout"],
                "reference_mode": cell.get("reference_mode", "exact"),
                "expected": fault["expect"],
                "status": cell["status"],
                "caught": cell["status"] == fault["expect"] and bool(cell["reason"]),
                "reason": cell["reason"],
            }
        )
    frame = pd.DataFrame(rows, columns=COLUMNS)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    write_with(table_path, lambda tmp: pq.write_table(table, tmp))
    write_with(markdown_path, lambda tmp: Path(tmp).write_text(markdown(frame)))


def markdown(frame: pd.DataFrame) -> str:
    missed = frame[~frame.caught]
    head = (
        f"# Fault campaign: {len(frame) - len(missed)} of {len(frame)} faults caught\n\n"
        if missed.empty
        else f"# Fault campaign: {len(missed)} of {len(frame)} faults MISSED by the verifier\n\n"
    )
    lines = ["| fault | cell | expected | status | reason |", "|---|---|---|---|---|"]
    for row in frame.itertuples():
        mark = "" if row.caught else " **MISSED**"
        cell = f"{row.model}: {row.save_layout} → {row.load_layout}"
        reason = row.reason.replace("|", "\\|")
        lines.append(f"| {row.fault} | {cell} | {row.expected} | {row.status}{mark} | {reason} |")
    return head + "\n".join(lines) + "\n"


def check(table_path: str, ok_path: str) -> int:
    frame = pd.read_parquet(table_path)
    missed = frame[~frame.caught]
    if missed.empty:
        write_text(ok_path, f"all {len(frame)} faults caught\n")
        return 0
    banner = "!" * 78
    print(banner, file=sys.stderr)
    print(
        f"SELF-TEST FAILED: the verifier missed {len(missed)} injected fault(s):", file=sys.stderr
    )
    for row in missed.itertuples():
        print(
            f"  {row.fault} on {row.model} {row.save_layout} -> {row.load_layout}: expected "
            f"{row.expected}, got {row.status} ({row.reason or 'no reason'})",
            file=sys.stderr,
        )
    print(banner, file=sys.stderr)
    return 1
