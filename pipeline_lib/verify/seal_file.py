"""The seal of a checkpoint (``verify.reference: sealed``): a digest of every file of what a
load reads (the checkpoint folder, or the full-state file), written by the save job once it has
compared the files with its live memory, and checked by every load job before it reads them.

The digest is xxHash's XXH3 128-bit (the ``xxhash`` package, pinned in requirements.txt): it
tells a changed, truncated, replaced or deleted file from the one the saver compared, at about
the speed memory is read (one core: about 20 GB/s here), so sealing costs little beside the
write. It guards against accidents (a file changed, lost or copied wrong between the jobs), not
against someone who wants to forge a file: that would take a cryptographic hash (docs:
verification.md). Pure Python; no torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import xxhash

ALGORITHM = "xxh3_128"
_CHUNK = 8 * 2**20  # bytes read at a time: memory stays bounded whatever the file's size


def seal_path(sealed: str) -> str:
    """Where the seal of ``sealed`` (a checkpoint folder or a file) lies: beside it, never
    inside (a DCP folder holds only what DCP wrote)."""
    return f"{str(sealed).rstrip('/')}.seal.json"


@dataclass(frozen=True)
class SealedFile:
    bytes: int
    digest: str


@dataclass(frozen=True)
class Seal:
    """Every file of a checkpoint (path relative to it; a file checkpoint: its own name) with
    its size and digest."""

    algorithm: str = ALGORITHM
    files: dict[str, SealedFile] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Seal:
        files = {name: SealedFile(**f) for name, f in data["files"].items()}
        return cls(algorithm=data["algorithm"], files=files)


def digest(path: Path) -> str:
    """The XXH3 128-bit digest of a file, read in chunks."""
    hasher = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def files_of(sealed: Path) -> dict[str, Path]:
    """Every file a seal of ``sealed`` covers: relative name -> path (sorted)."""
    if sealed.is_file():
        return {sealed.name: sealed}
    if not sealed.is_dir():
        return {}
    found = (p for p in sealed.rglob("*") if p.is_file() or p.is_symlink())
    return {str(p.relative_to(sealed)): p for p in sorted(found)}


def share(names: list[str], part: tuple[int, int]) -> list[str]:
    """The ``part`` (i, n) i-th of n shares of ``names`` (every n-th, sorted): the ranks of a
    job digest the files in parallel."""
    return sorted(names)[part[0] :: part[1]]


def make(sealed: str, part: tuple[int, int] = (0, 1)) -> Seal:
    """The seal of ``sealed``'s files as they are now (``part``: only that share of them)."""
    files = files_of(Path(sealed))
    mine = share(list(files), part)
    return Seal(files={n: SealedFile(files[n].stat().st_size, digest(files[n])) for n in mine})


def write(sealed: str, seal: Seal | None = None) -> Seal:
    """Write the seal of ``sealed`` beside it (``seal``: one made already; default: now)."""
    seal = seal or make(sealed)
    Path(seal_path(sealed)).write_text(json.dumps(seal.to_dict(), indent=1) + "\n")
    return seal


def check(sealed: str, part: tuple[int, int] = (0, 1)) -> str:
    """'' if every file the seal of ``sealed`` names is there with its size and digest and no
    other file is; else a one-line reason naming the first file that differs. ``part``: digest
    only that share of the files (the presence of every file is checked whatever the share)."""
    where = seal_path(sealed)
    try:
        seal = Seal.from_dict(json.loads(Path(where).read_text()))
    except FileNotFoundError:
        return f"seal: no seal at {where}"
    except (ValueError, KeyError, TypeError) as exc:
        return f"seal: {where} unreadable: {type(exc).__name__}: {exc}"
    if seal.algorithm != ALGORITHM:
        return f"seal: {where} uses {seal.algorithm!r}, this version checks {ALGORITHM}"
    found = files_of(Path(sealed))
    for name in sorted(set(seal.files) - set(found)):
        return f"seal: sealed file {name} is missing from {sealed}"
    for name in sorted(set(found) - set(seal.files)):
        return f"seal: file {name} in {sealed} is not in the seal"
    for name in share(list(seal.files), part):
        sealed_file = seal.files[name]
        size = found[name].stat().st_size
        if size != sealed_file.bytes:
            return f"seal: {name} changed since the save ({size} bytes, sealed {sealed_file.bytes})"
        now = digest(found[name])
        if now != sealed_file.digest:
            return (
                f"seal: {name} changed since the save ({ALGORITHM} {now}, sealed "
                f"{sealed_file.digest})"
            )
    return ""


def is_sealed(verify: dict) -> bool:
    """The config's ``verify.reference`` is ``sealed`` (exact when absent)."""
    return verify.get("reference", "exact") == "sealed"
