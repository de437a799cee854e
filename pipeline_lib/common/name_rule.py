"""The one rule for names that become paths, and the check that a path stays where it belongs.

Model, layout and torch-version names become folders and files (``results/save/<model>/
<layout>/``, ``results/torch/<version>/``, ``<torch_env_dir>/<version>/``) and Snakemake
wildcard values; axis values make the variant ids of ``results/axes/<id>/``. Torch-free.
"""

from __future__ import annotations

import re
from pathlib import Path

# Bytes. A path component may hold 255; a fault cell's folder joins a fault name and three names
# (``<fault>.<model>.<save>.<load>``) and temporary files add about 20 characters.
NAME_MAX = 64
_CHARS = re.compile(r"[A-Za-z0-9_.-]+")
# A model of your own: package.module:callable (its ':' is kept as is in paths).
_IMPORT_PATH = re.compile(
    r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*"
)
# Snakemake's PeriodicityDetector (snakemake.io) refuses a wildcard value that ends in one
# substring repeated 20 times or more (it takes it for an endless recursion of a rule).
_PERIODIC = re.compile(r"(.+?)\1{19,}$")


class UnsafePath(ValueError):
    """A path a config value produced would leave the folder it must stay in."""


def name_error(name: object, model: bool = False) -> str | None:
    """Why ``name`` cannot become a path component, or None. ``model``: an import path
    ``package.module:callable`` is allowed too."""
    if not isinstance(name, str):
        return f"a name must be a string, got {type(name).__name__}"
    if name in ("", ".", ".."):
        return f"{name!r} is not a usable name (it would name the folder itself or its parent)"
    if len(name.encode()) > NAME_MAX:
        return f"name {name[:20]!r}... is {len(name.encode())} bytes long (at most {NAME_MAX})"
    if not (_CHARS.fullmatch(name) or (model and _IMPORT_PATH.fullmatch(name))):
        allowed = "[A-Za-z0-9_.-]" + (" (or package.module:callable)" if model else "")
        return f"name {name!r} has characters outside {allowed}"
    if name.startswith("-"):
        return f"name {name!r} starts with '-' (it would read as a command-line option)"
    return periodic_error(name)


def variant_id_error(variant_id: str) -> str | None:
    """Why a variant id (pipeline_lib.plan.axes: ``mode-full+format-torch_save``, made of the axes'
    own values, never of config text) cannot be a folder name, or None."""
    if not re.fullmatch(r"[A-Za-z0-9_.+-]{1,255}", variant_id) or variant_id in (".", ".."):
        return f"variant id {variant_id[:40]!r} is not a usable folder name"
    return periodic_error(variant_id)


def periodic_error(value: str) -> str | None:
    """Why Snakemake would refuse ``value`` as a wildcard value (PeriodicWildcardError)."""
    # Snakemake's own short cut first: the last character must occur 20 times.
    match = value.count(value[-1:]) >= 20 and _PERIODIC.search(value)
    if match:
        times = len(match.group(0)) // len(match.group(1))
        return (
            f"{value[:40]!r} ends in {match.group(1)!r} repeated {times} times, which Snakemake"
            " refuses in a wildcard (PeriodicWildcardError)"
        )
    return None


def inside(path: str | Path, root: str | Path | None = None) -> Path:
    """``path`` resolved (symbolic links followed), checked to lie inside ``root`` (default: the
    working directory) and not to be ``root`` itself; raises UnsafePath otherwise."""
    root = Path.cwd() if root is None else Path(root)
    base, resolved = root.resolve(), (root / path).resolve()
    if resolved == base or not resolved.is_relative_to(base):
        raise UnsafePath(f"{path}: resolves to {resolved}, outside {base}; refused")
    return resolved
