"""The one timestamp format of records and reports: local time with its UTC offset."""

from __future__ import annotations

import time

FORMAT = "%Y-%m-%dT%H:%M:%S%z"


def now() -> str:
    """The current time, e.g. ``2026-12-02T12:52:35+0000``."""
    return time.strftime(FORMAT)
