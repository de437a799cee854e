"""One-line descriptions of exceptions for a cell's ``reason`` (torch-free)."""

from __future__ import annotations

import errno
import os
import shutil
import sys
import traceback

# What torch's own writers say when a write fails for want of space, with no errno to tell
# (torch.save on a full disk, torch 2.13: "[enforce fail at inline_container.cc:672] . unexpected
# pos 576 vs 534", from "basic_ios::clear: iostream error"); other causes are possible, so the
# reason says "no space left?" for these.
_NO_SPACE_TEXTS = ("file write failed", "unexpected pos", "iostream error")


# Escapes of the control characters a reason shows by name (others: \xNN, \uNNNN, \UNNNNNNNN).
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """``text`` as one printable line: every character ``str.isprintable`` refuses (newlines,
    tabs, ANSI escapes, other control and format characters, line and paragraph separators,
    lone surrogates) escaped visibly as Python writes it in a string literal (``\\n``,
    ``\\x1b``, ``\\u202e``), never dropped. Idempotent: an escape is printable."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(character: str) -> str:
    if character in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[character]
    code = ord(character)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def one_line(exc: BaseException) -> str:
    """Exception type and the first line of its message, as one printable line (``printable``:
    a message may carry a checkpoint's entry names, which may hold any character). DCP's
    CheckpointException (a BaseException) wraps one exception per failing rank: name the ranks
    and the first cause. A full disk (ENOSPC) names the path and the space left on its
    filesystem."""
    failures = getattr(exc, "failures", None)
    if type(exc).__name__ == "CheckpointException" and failures:
        rank = min(failures)
        return f"CheckpointException on rank(s) {sorted(failures)}: {one_line(failures[rank][0])}"
    lines = str(exc).strip().splitlines()
    text = printable(f"{type(exc).__name__}: {lines[0] if lines else ''}")
    if kind := no_space(exc):
        path = getattr(exc, "filename", None) or os.getcwd()
        # The whole reason stays short: the disk part is kept, the message is cut.
        where = printable(str(path))
        return f"{text[:240]} ({kind}: {free_space(path)} free on the filesystem of {where})"
    return text[:400]


def log_traceback(what: str, exc: BaseException) -> None:
    """The whole traceback of an exception a record keeps as one line, on stderr (the job's
    log), headed by the unit and rank: where in torch a cell's error comes from."""
    rank = os.environ.get("RANK", "?")
    lines = traceback.format_exception(exc)
    print(f"dcp-matrix: rank {rank}, {what}:\n{''.join(lines)}", file=sys.stderr, flush=True)
    for failed, (cause, stack) in (getattr(exc, "failures", None) or {}).items():
        # DCP's CheckpointException: each failing rank's exception and where it was raised
        where = "".join(stack.format()) if hasattr(stack, "format") else ""
        print(f"rank {failed}: {where}{whole_line(cause)}", file=sys.stderr, flush=True)


def whole_line(exc: BaseException) -> str:
    """Exception type and its whole message on one line (whitespace collapsed; at most 400
    characters): a load_state_dict error names its keys on the lines after the first."""
    return printable(f"{type(exc).__name__}: {' '.join(str(exc).split())}")[:400]


def no_space(exc: BaseException) -> str:
    """'disk full' when ``exc`` (or an exception it was raised from) is ENOSPC or EDQUOT, 'no
    space left?' when it is a torch write error that a full disk gives, else ''."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return "disk full"
        if isinstance(exc, RuntimeError) and any(t in str(exc) for t in _NO_SPACE_TEXTS):
            return "no space left?"
        exc = exc.__cause__ or exc.__context__
    return ""


def free_space(path: str | os.PathLike) -> str:
    """The free space of the filesystem holding ``path`` (its nearest existing folder)."""
    folder = os.path.abspath(path)
    while folder and not os.path.exists(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    try:
        return human_bytes(shutil.disk_usage(folder).free)
    except OSError:
        return "unknown space"


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Incompatible(Exception):
    """This model cannot run under this layout (the cell becomes ``skip``). Torch-free, so a
    model adapter can raise it without importing the worker (which runs as ``__main__``)."""
