"""The fault campaign's verdict: did the verifier give every injected fault its expected status?

A fault that yields ``pass`` (or any status other than the expected one) is a bug in the
verifier: ``check`` says so loudly and fails the run, after ``summarize`` kept the table.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline_lib.common.atomic import read_json, write_text, write_with
from pipeline_lib.verify.results import LoadRecord


@dataclass(frozen=True)
class FaultRow:
    """One row of the campaign's table: a fault, its cell, the status it expects and got, and
    whether the verifier caught it (that status, with a reason)."""

    fault: str
    model: str
    save_layout: str
    load_layout: str
    reference_mode: str
    expected: str
    status: str
    caught: bool
    reason: str

    @classmethod
    def of(cls, record: LoadRecord) -> FaultRow:
        """The row of a fault item's record (one cell)."""
        fault, (cell,) = record.fault, record.cells
        status, reason = cell["status"], cell["reason"]
        return cls(
            fault=fault.name, model=cell["model"], save_layout=cell["save_layout"],
            load_layout=cell["load_layout"],
            reference_mode=cell.get("reference_mode", "exact"), expected=fault.expect,
            status=status, caught=status == fault.expect and bool(reason), reason=reason,
        )  # fmt: skip


COLUMNS = [f.name for f in fields(FaultRow)]


def summarize(record_paths: list[str], table_path: str, markdown_path: str) -> None:
    rows = [asdict(FaultRow.of(LoadRecord.from_dict(read_json(path)))) for path in record_paths]
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
