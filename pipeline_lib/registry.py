"""Find plug-in modules (one framework or model per module) by name, without importing them."""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def module_names(package: str) -> list[str]:
    """Names of the public modules in ``package`` (files starting with '_' are helpers)."""
    pkg = importlib.import_module(package)
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def load_module(package: str, name: str) -> ModuleType:
    if name not in module_names(package):
        raise KeyError(f"unknown {package.rsplit('.', 1)[-1][:-1]} {name!r}")
    return importlib.import_module(f"{package}.{name}")
