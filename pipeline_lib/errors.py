"""One-line descriptions of exceptions for a cell's ``reason`` (torch-free)."""

from __future__ import annotations


def one_line(exc: BaseException) -> str:
    """Exception type and the first line of its message. DCP's CheckpointException (a
    BaseException) wraps one exception per failing rank: name the ranks and the first cause."""
    failures = getattr(exc, "failures", None)
    if type(exc).__name__ == "CheckpointException" and failures:
        rank = min(failures)
        return f"CheckpointException on rank(s) {sorted(failures)}: {one_line(failures[rank][0])}"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:400]


class Incompatible(Exception):
    """This model cannot run under this layout (the cell becomes ``skip``). Torch-free, so a
    model adapter can raise it without importing the worker (which runs as ``__main__``)."""
