"""A matrix.parquet given by the user (the gate's run, a baseline, the reproducers' input), read
with a one-line error naming the file instead of a traceback.

A matrix may come from anywhere (an older run, another machine, a file edited by hand): it must
be a regular Parquet file with the cell key columns, ``status`` and ``reason``, and every row
must have a status. Axis columns an older matrix lacks hold their default value.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline_lib.verify.records import AXIS_COLUMNS, CELL_KEYS

# What every comparison and reproducer reads; the axis columns may be missing (older matrices).
REQUIRED_COLUMNS = [k for k in CELL_KEYS if k not in AXIS_COLUMNS] + ["status", "reason"]


class MatrixFileError(ValueError):
    """The file is not a usable matrix; the message (one line) names it."""


def with_default_axes(matrix: pd.DataFrame) -> pd.DataFrame:
    """A matrix written before an axis column existed (load_mode) holds its default value."""
    from pipeline_lib.plan.axes import DEFAULT

    missing = {a: getattr(DEFAULT, a) for a in AXIS_COLUMNS if a not in matrix.columns}
    return matrix.assign(**missing) if missing else matrix


def read_matrix(path: str | Path, what: str = "matrix") -> pd.DataFrame:
    """The matrix at ``path`` (default axis values filled in), or MatrixFileError. ``what``
    names the file's role in the message ("baseline matrix")."""
    if not Path(path).is_file():
        raise MatrixFileError(f"{path}: the {what} is not a file")
    try:
        matrix = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises many kinds of exception for a bad file
        detail = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise MatrixFileError(f"{path}: cannot read the {what} as Parquet: {detail}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in matrix.columns]
    if missing:
        raise MatrixFileError(
            f"{path}: the {what} lacks column(s) {', '.join(missing)}: not a dcp-matrix matrix"
        )
    bad = sum(not (isinstance(status, str) and status) for status in matrix.status.tolist())
    if bad:
        raise MatrixFileError(
            f"{path}: status: {bad} of {len(matrix)} row(s) of the {what} have no status"
        )
    return with_default_axes(matrix)
