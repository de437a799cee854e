"""``combine_axes: pairwise``: a covering array of the axes' values, made by covertable.

Every value of any axis meets every value of any other axis in at least one row, except for
pairs no row can hold (the constraints refuse every row with both); a row is never one the
constraints refuse. covertable (pinned in requirements.txt) is deterministic: its default
sorter orders the pairs by an FNV-1a hash of their positions, not by Python's salted hash,
and its greedy criterion takes the first best pair in that order, so the same axes and values
in the same order give the same rows on every run and machine (tests/test_pairwise.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from covertable import make

# A constraint: the axes it reads, and whether a row's values of them (at least) can combine.
Constraint = tuple[Iterable[str], Callable[[dict[str, str]], bool]]


def covering_rows(values: dict[str, list[str]], constraints: list[Constraint]) -> list[dict]:
    """Rows (axis -> value) covering every pair of values of two axes that some allowed row
    holds. Each constraint is checked as soon as the axes it reads have values."""
    declared = [
        {"operator": "fn", "requires": list(reads), "evaluate": allows}
        for reads, allows in constraints
    ]
    return make({axis: list(vals) for axis, vals in values.items()}, constraints=declared)
