"""Write files atomically: a killed job leaves the old file or the new one, never half a file.

The new file is written beside the old one under a temporary name (``.<name>.<random>.tmp``),
flushed to disk (fsync), renamed over it, and the folder is flushed too, so that after a power
cut the name points at complete data. A temporary file is removed when its write fails; one a
SIGKILL left behind is removed by the next write of the same path (each path has one writer at
a time in this pipeline) and is never read: readers open the final names only.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from pipeline_lib.common.errors import no_space

# A filesystem with less free space than this, when a torch write error says nothing more, is
# taken to be full.
FULL_BELOW = 2**20


def _fsync(path: str | Path) -> None:
    """Flush a file's or a folder's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stale_temporaries(path: str | Path) -> list[Path]:
    """Temporary files an interrupted write of ``path`` left behind."""
    path = Path(path)
    pattern = f".{glob.escape(path.name)}.*.tmp"
    return sorted(path.parent.glob(pattern))


@contextmanager
def _temporary(path: Path) -> Iterator[Path]:
    """A fresh temporary path beside ``path``, removed on the way out unless renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_temporaries(path):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp makes the file owner-only; give it the mode a plain open() would (umask applies).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT) and not exc.filename:
            raise OSError(exc.errno, f"{os.strerror(exc.errno)} writing {path}", str(path)) from exc
        raise
    except RuntimeError as exc:  # torch.save's writer on a full disk (errors.no_space)
        if no_space(exc) and shutil.disk_usage(path.parent).free < FULL_BELOW:
            raise OSError(errno.ENOSPC, f"{exc} writing {path}", str(path)) from exc
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_paths(*paths: str | Path) -> Iterator[list[Path]]:
    """Temporary paths beside each of ``paths``; once the block succeeds, each is flushed to
    disk, then all are renamed over their paths in order (and their folders flushed). A kill
    between two renames leaves a mix of old and new files: a reader that must tell says so
    with a token of its own in both (pipeline_lib.results.aggregate)."""
    targets = [Path(p) for p in paths]
    with ExitStack() as stack:
        tmps = [stack.enter_context(_temporary(p)) for p in targets]
        yield tmps
        for tmp in tmps:
            _fsync(tmp)
        for tmp, target in zip(tmps, targets, strict=True):
            os.replace(tmp, target)
        for folder in dict.fromkeys(t.parent for t in targets):
            _fsync(folder)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` if the block succeeds."""
    with atomic_paths(path) as (tmp,):
        yield tmp


def write_with(path: str | Path, writer: Callable[[Path], Any]) -> None:
    with atomic_path(path) as tmp:
        writer(tmp)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())
