"""The JSON round trip of the pipeline's typed data (layouts, results, records): a dataclass's
fields are its JSON object's keys, and reading an object that has a key the class does not
know, or lacks one it requires, is an error naming the keys. Pure (no torch).
"""

from __future__ import annotations

from dataclasses import MISSING, fields


class FormError(ValueError):
    """JSON that does not have the form the pipeline writes: names the type and the keys."""


def checked_keys(cls, data, extra: frozenset[str] = frozenset(), every: bool = False) -> dict:
    """``data`` (a JSON object) for ``cls(**data)``: every key a field of ``cls`` (or in
    ``extra``: keys the caller handles itself), every field without a default present (with
    ``every``: every field, for a type whose JSON always holds them all)."""
    if not isinstance(data, dict):
        raise FormError(f"{cls.__name__}: not a JSON object: {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known) - extra)
    missing = sorted(
        name
        for name, f in known.items()
        if name not in data and (every or (f.default is MISSING and f.default_factory is MISSING))
    )
    problems = [f"{what} key(s) {', '.join(keys)}" for what, keys in
                (("unknown", unknown), ("missing", missing)) if keys]  # fmt: skip
    if problems:
        raise FormError(f"{cls.__name__}: {'; '.join(problems)}")
    return dict(data)
