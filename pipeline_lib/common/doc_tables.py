"""A docs page's generated table: the text between two marker comments, written or checked by a
command (``python -m pipeline_lib <name> --write <page>``) from the data it shows, never by
hand."""

from __future__ import annotations

from pathlib import Path


def begin_marker(name: str, page: str) -> str:
    """The comment that opens the table: it says how to regenerate it."""
    return f"<!-- {name}: python -m pipeline_lib {name} --write {page} -->"


def end_marker(name: str) -> str:
    return f"<!-- /{name} -->"


def with_table(text: str, name: str, table: str) -> str:
    """``text`` with the table between its markers replaced by ``table`` (ValueError: no
    markers)."""
    begin = text.index(f"<!-- {name}: ")
    start, end = text.index("-->", begin) + len("-->"), text.index(end_marker(name), begin)
    return text[:start] + "\n" + table + text[end:]


def write(name: str, page: str | None, table: str, check: bool = False) -> int:
    """No page: print the table. Else replace the page's table (``check``: only compare, exit
    status 1 and one line when it differs). The exit status."""
    if page is None:
        print(table, end="")
        return 0
    path = Path(page)
    old = path.read_text()
    try:
        new = with_table(old, name, table)
    except ValueError:
        print(f"{page}: no {begin_marker(name, page)} ... {end_marker(name)} in it")
        return 1
    if check:
        if new != old:
            print(f"{page}: the {name} differs from its source (regenerate: python -m "
                  f"pipeline_lib {name} --write {page})")  # fmt: skip
            return 1
        return 0
    path.write_text(new)
    return 0
