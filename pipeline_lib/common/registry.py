"""Find plug-in modules (one framework or model per module) by name, without importing them; and
find and import the user's own code a config names by import path (``package.module:name``:
your own model, your own naming).

A config is code only where it names the user's own code, and only the user's own: a module
found on ``sys.path`` (or the working directory) as a Python source file outside the standard
library, installed packages (``site-packages``, ``dist-packages``), torch and this tool
(``locate``, which finds it without running anything: no import, not even of its parent
packages). What the name then names must be defined in that module by the user: a plain Python
function (a class too, where a class may build a model), never a built-in, a C function, a
class or a function of another module (``own_error``). ``os:system``, ``builtins:eval``,
``shutil:rmtree`` are refused by the first rule, ``mine:system`` (``from os import system``
in your module) by the second.
"""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import os
import pkgutil
import site
import sys
import sysconfig
import types
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

# Folder names that hold installed packages, wherever they are (a venv, a conda env, Debian's).
_INSTALLED = ("site-packages", "dist-packages")


def module_names(package: str) -> list[str]:
    """Names of the public modules in ``package`` (files starting with '_' are helpers)."""
    pkg = importlib.import_module(package)
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


@dataclass(frozen=True)
class UserCode:
    """``package.module:name`` located: the module's name, the name in it, its source file."""

    module: str
    attr: str
    origin: Path


def locate(name: str, error: type[Exception]) -> UserCode:
    """Where ``package.module:name`` is defined, found without running anything; ``error`` (its
    message says why) for a name that is not an import path, a module that is part of Python,
    cannot be found, is no Python source file, or is not the user's own (``foreign_error``)."""
    module, _, attr = name.partition(":")
    if not (attr.isidentifier() and all(part.isidentifier() for part in module.split("."))):
        raise error(f"{name!r} is not an import path (package.module:name)")
    _search_working_directory()
    top = module.split(".")[0]
    if top in sys.builtin_module_names or importlib.machinery.FrozenImporter.find_spec(top):
        raise error(f"{module!r} is part of Python, not your own module")
    spec, search, parts = None, None, module.split(".")
    for i in range(len(parts)):
        full = ".".join(parts[: i + 1])
        spec = importlib.machinery.PathFinder.find_spec(full, search)
        if spec is None:
            raise error(f"cannot import {module!r}: ModuleNotFoundError: No module named {full!r}")
        search = spec.submodule_search_locations
        if search is None and full != module:
            raise error(f"cannot import {module!r}: {full!r} is not a package")
    origin = Path(spec.origin) if spec and spec.origin else None
    if origin is None or origin.suffix != ".py" or not origin.is_file():
        raise error(f"{module!r} is not a Python source file (found: {spec.origin})")
    origin = origin.resolve()
    if why := foreign_error(origin):
        raise error(f"{module!r} ({origin}) is {why}, not your own module")
    return UserCode(module, attr, origin)


def foreign_error(path: Path) -> str | None:
    """What ``path`` is when it is not the user's own code (part of the standard library, an
    installed package, part of torch or of this tool), or None."""
    if any(part in _INSTALLED for part in path.parts):
        return "an installed package"
    for root, what in _foreign_roots():
        if path.is_relative_to(root):
            return what
    return None


@cache
def _foreign_roots() -> tuple[tuple[Path, str], ...]:
    """(folder, what it is) of the code that is not the user's, most specific first."""
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}
    found = []
    for paths in (sysconfig.get_paths(), sysconfig.get_paths(vars=base)):
        found += [(paths[key], "an installed package") for key in ("purelib", "platlib")]
    found += [(p, "an installed package") for p in site.getsitepackages()]
    found.append((site.getusersitepackages(), "an installed package"))
    torch = importlib.machinery.PathFinder.find_spec("torch")
    if torch is not None and torch.submodule_search_locations:
        found += [(p, "part of torch") for p in torch.submodule_search_locations]
    found.append((Path(__file__).resolve().parents[1], "part of dcp-matrix"))
    for paths in (sysconfig.get_paths(), sysconfig.get_paths(vars=base)):
        found += [(paths[key], "part of the standard library") for key in ("stdlib", "platstdlib")]
    return tuple((Path(p).resolve(), what) for p, what in found if p)


def _search_working_directory() -> None:
    """Import from the working directory too, as `python -m` (every worker rank) does: the
    config check then sees the same modules as the jobs, also under `snakemake -d DIR`."""
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())


def top_level_function(code: UserCode, error: type[Exception]) -> ast.FunctionDef:
    """The ``def`` of ``code.attr`` at the top level of its module's source, read (never run);
    ``error`` when the name is bound last by anything else (an assignment, an import, a class,
    a decorated or async def, a def inside an ``if``, ``try`` or loop) or not at all."""
    where = f"{code.module}:{code.attr}"
    try:
        tree = ast.parse(code.origin.read_bytes(), str(code.origin))
    except (OSError, SyntaxError, ValueError) as exc:
        raise error(f"cannot read {code.origin}: {type(exc).__name__}: {exc}") from None
    binding = None
    for node in tree.body:
        if code.attr in _bound(node):
            binding = node
    if binding is None:
        raise error(f"{code.module!r} has no callable {code.attr!r}")
    if not isinstance(binding, ast.FunctionDef) or binding.decorator_list:
        raise error(
            f"{where} is not a plain function: it must be defined with def (no decorator) at "
            f"the top level of {code.origin}, line {binding.lineno} binds it otherwise"
        )
    return binding


def _bound(node: ast.stmt) -> set[str]:
    """The module-level names a top-level statement binds (those of nested blocks included)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    names = set()
    for child in ast.walk(node):
        if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store):
            names.add(child.id)
        elif child is not node and isinstance(child, ast.stmt):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(child.name)
            elif isinstance(child, (ast.Import, ast.ImportFrom)):
                names |= {(a.asname or a.name).split(".")[0] for a in child.names}
    return names


def import_path(name: str, error: type[Exception], classes: bool = False) -> tuple[ModuleType, Any]:
    """(module, what it names) for ``package.module:name``: ``locate``d, imported (which runs the
    module), and what it names checked to be the user's own (``own_error``; ``classes``: a
    class defined in the module is accepted too). ``error`` (its message says why) otherwise."""
    code = locate(name, error)
    try:
        module = importlib.import_module(code.module)
    except Exception as exc:
        raise error(f"cannot import {code.module!r}: {type(exc).__name__}: {exc}") from exc
    loaded = Path(getattr(module, "__file__", None) or "").resolve()
    if loaded != code.origin:
        raise error(f"{code.module!r} was imported from {loaded}, not from {code.origin}")
    found = getattr(module, code.attr, None)
    if not callable(found):
        raise error(f"{code.module!r} has no callable {code.attr!r}")
    if why := own_error(found, code, classes):
        raise error(f"{code.module}:{code.attr} {why}")
    return module, found


def own_error(found: Any, code: UserCode, classes: bool = False) -> str | None:
    """Why ``found`` is not a plain Python function (or with ``classes``, a class) defined in
    ``code``'s module, or None."""
    if isinstance(found, type):
        if not classes:
            return f"is a class ({found.__module__}.{found.__qualname__}), not a function"
        if found.__module__ != code.module:
            return f"is the class {found.__module__}.{found.__qualname__}, not one of its module"
        return None
    if isinstance(found, (types.BuiltinFunctionType, types.BuiltinMethodType)):
        return "is a built-in (C) function, not a plain Python function"
    if not isinstance(found, types.FunctionType):
        return f"is a {type(found).__qualname__} object, not a plain Python function"
    source = Path(found.__code__.co_filename).resolve()
    if found.__module__ != code.module or source != code.origin:
        return f"is {found.__module__}.{found.__qualname__} ({source}), not its module's own"
    return None


def load_module(package: str, name: str) -> ModuleType:
    if name not in module_names(package):
        raise KeyError(f"unknown {package.rsplit('.', 1)[-1][:-1]} {name!r}")
    return importlib.import_module(f"{package}.{name}")
