"""What a rerun compares besides a unit's spec (pipeline_lib.job.reuse): the project's code
version and the job's environment, each a SHA-256; and ``digest``, the SHA-256 of a JSON value.
Read by the reuse store's keys and by the Snakemake rules' params (a change reruns the jobs)."""

from __future__ import annotations

import hashlib
import json
import sys
from functools import cache
from importlib import metadata
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent  # pipeline_lib/


@cache
def code_version() -> str:
    """SHA-256 of every Python file of pipeline_lib (its path and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@cache
def environment() -> str:
    """SHA-256 of this interpreter's Python version and installed distributions."""
    packages = sorted(f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions())
    return digest([sys.version, packages])


def digest(value) -> str:
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
