"""Text taken from results (reasons, names, package lists) made safe to print or to render.

A reason, a model's or an entry's name, a matrix given to the gate: any of them may hold
control characters (ANSI escapes that recolour or rewrite a terminal, carriage returns that
hide a line, newlines that start a line of their own) or text that a CI runner reads as a
command (GitHub Actions runs a line that starts with ``::``, e.g. ``::error title=x::y``, as a
workflow command). What the gate prints and the report writes goes through these functions:
control characters become visible escapes (``\\x1b``), and no line starts with ``::``.
Pure (no pandas, no torch).
"""

from __future__ import annotations

import re
import unicodedata

# What a GitHub Actions runner takes for a workflow command: "::" at the start of a line, after
# any whitespace (the runner trims the line first).
_COMMAND_START = re.compile(r"^(\s*)::", re.M)


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _hidden(char: str) -> bool:
    """Control (Cc), format (Cf: bidirectional overrides, zero-width), line and paragraph
    separators, surrogates and unassigned code points: what changes or hides text."""
    return unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn")


def visible(text: object, keep: str = "") -> str:
    """``text`` with every control or formatting character written as its escape (``\\x1b``,
    ``\\n``-as-``\\x0a``, ``\\u202e``), but those in ``keep`` (e.g. a newline inside a block of
    lines). The backslash itself is left alone: the escapes are for a reader, not a parser."""
    return "".join(_escape(c) if _hidden(c) and c not in keep else c for c in str(text))


def no_command(text: str) -> str:
    """``text`` with a ``::`` that starts any of its lines written as GitHub's escape of a
    colon (``%3A%3A``): never a workflow command."""
    return _COMMAND_START.sub(r"\1%3A%3A", text)


def line(text: object) -> str:
    """One printable line: control characters (newlines too) visible, no leading ``::``."""
    return no_command(visible(text))


def lines(text: object) -> str:
    """A block of lines (a package list): newlines and tabs kept, every other control
    character visible, no line starting with ``::``."""
    return no_command(visible(text, keep="\n\t"))


def fence(text: str) -> str:
    """A Markdown code fence for ``text``: longer than any run of backticks in it, so that no
    line of it closes the fence (CommonMark: a closing fence is at least as long as the
    opening one)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)
