"""Find plug-in modules (one framework or model per module) by name, without importing them."""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from types import ModuleType
from typing import Any


def module_names(package: str) -> list[str]:
    """Names of the public modules in ``package`` (files starting with '_' are helpers)."""
    pkg = importlib.import_module(package)
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def import_path(name: str, error: type[Exception]) -> tuple[ModuleType, Any]:
    """(module, its callable) named ``package.module:callable``; ``error`` (its message says
    why) when the module does not import or has no such callable. Imports from the working
    directory too, as `python -m` (every worker rank) does: the config check then sees the same
    modules as the jobs, also under `snakemake -d DIR`."""
    module_name, _, attr = name.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise error(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from exc
    found = getattr(module, attr, None)
    if not callable(found):
        raise error(f"{module_name!r} has no callable {attr!r}")
    return module, found


def load_module(package: str, name: str) -> ModuleType:
    if name not in module_names(package):
        raise KeyError(f"unknown {package.rsplit('.', 1)[-1][:-1]} {name!r}")
    return importlib.import_module(f"{package}.{name}")
