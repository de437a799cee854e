"""One Python file made of the pipeline's own code: the functions, classes and constants that a
set of roots reaches, copied from their modules' source (comments kept), so that the file runs
what the pipeline runs and changes when the pipeline does (a reproducer:
pipeline_lib.results.reproducer).

What a definition names is found in its syntax tree, scope by scope (a function's own variables
are left alone): a definition of its module, a name imported from another pipeline_lib module,
``module.name`` of an imported pipeline_lib module, or a name imported from outside the package.
Each definition the roots reach is copied once, under its own name (qualified by its module,
``training_build``, where two modules define one name), with every reference to a pipeline_lib
definition rewritten to that name and the imports of pipeline_lib names removed; imports from
outside the package go to the top of the file. Definitions come in the order their module-level
code needs them (base classes, decorators, constants), else by module and line.

A ``Seam`` stands in for a definition the file must not copy: another definition (what the
reproducer does differently: how ranks start, which frameworks exist), or a stub that raises
(code a reproducer leaves out). Pure: reads the package's source files, imports none of them.
"""

from __future__ import annotations

import ast
import builtins
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "pipeline_lib"
SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding pipeline_lib/
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
# A module's own attributes: the file's are not the module's.
_MODULE_DUNDERS = {"__name__", "__file__", "__spec__", "__package__", "__path__", "__doc__"}
_STUBS = "--- code this file leaves out (a seam without a stand-in): calling it raises"
_DEFINES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)


class InlineError(ValueError):
    """A root that cannot be inlined: the message names the definition and why."""


@dataclass(frozen=True, order=True)
class Ref:
    """A module-level name of a pipeline_lib module: ``pipeline_lib.job.training:build``."""

    module: str
    name: str

    @classmethod
    def parse(cls, text: str) -> Ref:
        module, _, name = text.partition(":")
        return cls(module, name)

    def __str__(self) -> str:
        return f"{self.module}:{self.name}"


@dataclass(frozen=True)
class Seam:
    """What stands in for a definition: ``by`` (another definition), or with ``by`` None a stub
    that raises NotImplementedError saying ``why``."""

    why: str
    by: Ref | None = None


@dataclass(frozen=True)
class _Binding:
    """What a module-level (or function-local) imported name stands for."""

    kind: str  # module (a pipeline_lib module), symbol (a name of one), external
    target: str  # the module's dotted name; external: the dotted name imported
    name: str = ""  # symbol: its name in ``target``
    statement: str = ""  # external: the import statement that binds it


def _module_file(module: str, root: Path) -> Path | None:
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _import_bindings(stmt: ast.Import | ast.ImportFrom, root: Path) -> dict[str, _Binding]:
    """The names an import statement binds, each with what it stands for."""
    found = {}
    if isinstance(stmt, ast.ImportFrom):
        if stmt.level:
            raise InlineError(f"line {stmt.lineno}: relative import")
        if stmt.module == "__future__":
            return {}
        for alias in stmt.names:
            bound, full = alias.asname or alias.name, f"{stmt.module}.{alias.name}"
            if not _ours(stmt.module):
                text = f"from {stmt.module} import {alias.name}"
                found[bound] = _Binding("external", full, statement=_as(text, alias))
            elif _module_file(full, root):
                found[bound] = _Binding("module", full)
            else:
                found[bound] = _Binding("symbol", stmt.module, alias.name)
        return found
    for alias in stmt.names:
        bound = alias.asname or alias.name.split(".")[0]
        target = alias.name if alias.asname else bound
        if _ours(alias.name):
            found[bound] = _Binding("module", target)
        else:
            text = _as(f"import {alias.name}", alias)
            found[bound] = _Binding("external", target, statement=text)
    return found


def _ours(module: str) -> bool:
    return module == PACKAGE or module.startswith(PACKAGE + ".")


def _as(text: str, alias: ast.alias) -> str:
    return f"{text} as {alias.asname}" if alias.asname else text


class _Module:
    """A pipeline_lib module's source, its module-level definitions and imported names."""

    def __init__(self, name: str, root: Path):
        path = _module_file(name, root)
        if path is None:
            raise InlineError(f"{name}: no such module under {root}")
        self.name = name
        self.relative = path.relative_to(root).as_posix()
        self.source = path.read_text()
        self.tree = ast.parse(self.source, str(path))
        self.lines = self.source.splitlines(keepends=True)
        self.defs: dict[str, ast.stmt] = {}
        self.bindings: dict[str, _Binding] = {}
        self.uses: dict[int, _Uses] = {}  # a statement's line -> what it refers to
        for stmt in self.tree.body:
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                self.bindings.update(_import_bindings(stmt, root))
            elif isinstance(stmt, _DEFINES):
                self.defs.update(dict.fromkeys(_defined_names(stmt), stmt))

    @property
    def summary(self) -> str:
        """The first sentence of the module's docstring."""
        doc = ast.get_docstring(self.tree) or ""
        text = " ".join(doc.split())
        return text.split(". ")[0].rstrip(".")


def _defined_names(stmt: ast.stmt) -> list[str]:
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [stmt.name]
    targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
    names = []
    for target in targets:
        names += [n.id for n in ast.walk(target) if isinstance(n, ast.Name)]
    return names


@dataclass
class _Scope:
    """A function, lambda, comprehension or class body: the names it binds itself and the
    pipeline_lib names it imports."""

    names: set[str]
    imports: dict[str, _Binding]
    is_class: bool = False


@dataclass
class _Use:
    """A reference in a definition's text to a module-level name of the pipeline."""

    node: ast.AST  # the Name, or the Attribute ``module.name``
    ref: Ref
    lazy: bool  # inside a function body: not needed when the definition itself runs
    shadowed: frozenset[str]  # the names bound in the scopes around it


@dataclass
class _Uses:
    """Everything one module-level statement refers to."""

    uses: list[_Use] = field(default_factory=list)
    externals: set[str] = field(default_factory=set)  # bound names of external imports
    removed: list[ast.stmt] = field(default_factory=list)  # function-local pipeline imports


def _bound_in(body: list[ast.AST], root: Path) -> _Scope:
    """The names a scope's own code binds (not its nested scopes'), and its pipeline imports."""
    scope = _Scope(set(), {})
    stack = list(body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope.names.add(node.name)
            stack += node.decorator_list
            if not isinstance(node, ast.ClassDef):
                stack += node.args.defaults + [d for d in node.args.kw_defaults if d]
            continue
        if isinstance(node, ast.Lambda):
            continue
        if isinstance(node, _COMPREHENSIONS):  # its := binds in the enclosing function
            scope.names |= _walrus_targets(node)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for name, binding in _import_bindings(node, root).items():
                if binding.kind == "external":
                    scope.names.add(name)
                else:
                    scope.imports[name] = binding
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            scope.names.add(node.id)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            scope.names.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            raise InlineError(f"line {node.lineno}: global/nonlocal statement")
        stack += list(ast.iter_child_nodes(node))
    return scope


class _Walker:
    """Finds the uses of module-level names in one module-level statement."""

    def __init__(self, module: _Module, modules: _Modules):
        self.module, self.modules, self.found = module, modules, _Uses()

    def statement(self, stmt: ast.stmt) -> _Uses:
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)):
            if stmt.value is not None:
                self.visit(stmt.value, [], lazy=False)
        else:
            self.visit(stmt, [], lazy=False)
        return self.found

    def visit(self, node: ast.AST, scopes: list[_Scope], lazy: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            self._function(node, scopes, lazy)
        elif isinstance(node, ast.Lambda):
            self._arguments(node.args, scopes, lazy)
            inner = _Scope({a.arg for a in _all_args(node.args)}, {})
            self.visit(node.body, [*scopes, inner], lazy=True)
        elif isinstance(node, ast.ClassDef):
            for child in [*node.decorator_list, *node.bases, *node.keywords]:
                self.visit(child, scopes, lazy)
            inner = _bound_in(node.body, self.modules.root)
            inner.is_class = True
            for child in node.body:
                self.visit(child, [*scopes, inner], lazy)
        elif isinstance(node, _COMPREHENSIONS):
            self._comprehension(node, scopes, lazy)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            if scopes and any(
                b.kind != "external" for b in _import_bindings(node, self.modules.root).values()
            ):
                self.found.removed.append(node)
        elif isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Load):
                self._name(node, scopes, lazy)
        elif isinstance(node, ast.Attribute):
            target = self._module_of(node.value, scopes)
            if target is None:
                self.visit(node.value, scopes, lazy)
            elif _module_file(f"{target}.{node.attr}", self.modules.root) is None:
                self._use(node, Ref(target, node.attr), scopes, lazy)
            else:
                raise InlineError(self._where(node, f"module {target}.{node.attr} as a value"))
        elif isinstance(node, ast.AnnAssign):
            self._annotation(node.annotation, scopes)
            for child in (node.target, node.value):
                if child is not None:
                    self.visit(child, scopes, lazy)
        else:
            for child in ast.iter_child_nodes(node):
                self.visit(child, scopes, lazy)

    def _annotation(self, node: ast.AST | None, scopes: list[_Scope]) -> None:
        """Annotations are not evaluated (from __future__ import annotations): only the
        outside names they use are imported, for a reader and a linter."""
        for name in ast.walk(node) if node is not None else ():
            if isinstance(name, ast.Name):
                binding = self._binding(name.id, scopes)
                if isinstance(binding, _Binding) and binding.kind == "external":
                    self.found.externals.add(name.id)

    def _function(self, node, scopes: list[_Scope], lazy: bool) -> None:
        for child in node.decorator_list:
            self.visit(child, scopes, lazy)
        self._arguments(node.args, scopes, lazy)
        for annotation in [*(a.annotation for a in _all_args(node.args)), node.returns]:
            self._annotation(annotation, scopes)
        inner = _bound_in(node.body, self.modules.root)
        inner.names |= {a.arg for a in _all_args(node.args)}
        for child in node.body:
            self.visit(child, [*scopes, inner], lazy=True)

    def _arguments(self, args: ast.arguments, scopes: list[_Scope], lazy: bool) -> None:
        for default in [*args.defaults, *[d for d in args.kw_defaults if d is not None]]:
            self.visit(default, scopes, lazy)

    def _comprehension(self, node, scopes: list[_Scope], lazy: bool) -> None:
        generators = node.generators
        self.visit(generators[0].iter, scopes, lazy)
        inner = _Scope(_walrus_targets(node), {})
        for generator in generators:
            inner.names |= {n.id for n in ast.walk(generator.target) if isinstance(n, ast.Name)}
        inside = [*scopes, inner]
        for i, generator in enumerate(generators):
            if i:
                self.visit(generator.iter, inside, lazy)
            for condition in generator.ifs:
                self.visit(condition, inside, lazy)
        parts = [node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]
        for part in parts:
            self.visit(part, inside, lazy)

    def _visible(self, scopes: list[_Scope]) -> list[_Scope]:
        """The scopes a name is looked up in: a class body only from its own code."""
        return [s for i, s in enumerate(scopes) if not s.is_class or i == len(scopes) - 1]

    def _binding(self, name: str, scopes: list[_Scope]) -> _Binding | str | None:
        """A function-local pipeline import, "local" for a name a scope binds, else the
        module-level binding (None: a definition of the module, or a builtin)."""
        for scope in reversed(self._visible(scopes)):
            if name in scope.imports:
                return scope.imports[name]
            if name in scope.names:
                return "local"
        return self.module.bindings.get(name)

    def _name(self, node: ast.Name, scopes: list[_Scope], lazy: bool) -> None:
        binding = self._binding(node.id, scopes)
        if binding == "local":
            return
        if binding is None:
            if node.id in self.module.defs:
                self._use(node, Ref(self.module.name, node.id), scopes, lazy)
            elif not hasattr(builtins, node.id) or node.id in _MODULE_DUNDERS:
                raise InlineError(self._where(node, f"name {node.id!r} is not defined"))
        elif binding.kind == "external":
            self.found.externals.add(node.id)
        elif binding.kind == "symbol":
            self._use(node, Ref(binding.target, binding.name), scopes, lazy)
        else:
            raise InlineError(self._where(node, f"module {binding.target} as a value"))

    def _module_of(self, node: ast.AST, scopes: list[_Scope]) -> str | None:
        """The pipeline_lib module an expression names (``training``,
        ``pipeline_lib.models``), or None."""
        if isinstance(node, ast.Name):
            binding = self._binding(node.id, scopes)
            if isinstance(binding, _Binding) and binding.kind == "module":
                return binding.target
            return None
        if isinstance(node, ast.Attribute):
            outer = self._module_of(node.value, scopes)
            if outer and _module_file(f"{outer}.{node.attr}", self.modules.root):
                return f"{outer}.{node.attr}"
        return None

    def _use(self, node: ast.AST, ref: Ref, scopes: list[_Scope], lazy: bool) -> None:
        shadowed = frozenset().union(*(s.names for s in self._visible(scopes)))
        self.found.uses.append(_Use(node, ref, lazy, shadowed))

    def _where(self, node: ast.AST, what: str) -> str:
        return f"{self.module.relative}:{getattr(node, 'lineno', '?')}: {what}"


def _walrus_targets(node: ast.AST) -> set[str]:
    return {n.target.id for n in ast.walk(node) if isinstance(n, ast.NamedExpr)}


def _all_args(args: ast.arguments) -> list[ast.arg]:
    extra = [a for a in (args.vararg, args.kwarg) if a is not None]
    return [*args.posonlyargs, *args.args, *args.kwonlyargs, *extra]


_READ: dict[tuple, _Module] = {}  # (file, its size and modification time) -> the module


def _read(name: str, root: Path) -> _Module:
    """The module ``name`` under ``root``, parsed once per version of its file."""
    path = _module_file(name, root)
    stat = path.stat() if path else None
    key = (name, str(root), stat and (stat.st_size, stat.st_mtime_ns))
    if key not in _READ:
        _READ[key] = _Module(name, root)
    return _READ[key]


class _Modules:
    """The pipeline_lib modules read so far, by dotted name."""

    def __init__(self, root: Path):
        self.root, self.by_name = root, {}

    def __getitem__(self, name: str) -> _Module:
        if name not in self.by_name:
            self.by_name[name] = _read(name, self.root)
        return self.by_name[name]

    def uses(self, module: _Module, stmt: ast.stmt) -> _Uses:
        """What ``stmt`` refers to (found once per version of the module's file)."""
        if stmt.lineno not in module.uses:
            module.uses[stmt.lineno] = _Walker(module, self).statement(stmt)
        return module.uses[stmt.lineno]

    def definition(self, ref: Ref) -> Ref:
        """Where ``ref`` is defined (an imported name followed to its module)."""
        seen = set()
        while ref not in seen:
            seen.add(ref)
            module = self[ref.module]
            if ref.name in module.defs:
                return ref
            binding = module.bindings.get(ref.name)
            if binding is None or binding.kind != "symbol":
                break
            ref = Ref(binding.target, binding.name)
        raise InlineError(f"{ref}: no such definition")


@dataclass
class _Unit:
    """One module-level statement the file copies, or a stub standing for a seamed name."""

    key: tuple[str, str]  # (module, line) of the statement; ("~", ref) of a stub
    ref: Ref  # the name that first reached it
    module: _Module | None
    stmt: ast.stmt | None
    uses: _Uses
    stub: Seam | None = None

    @property
    def names(self) -> list[str]:
        """The names it defines."""
        return [Ref.parse(self.key[1]).name] if self.stmt is None else _defined_names(self.stmt)


@dataclass
class Bundle:
    """The file's code: ``imports`` (from outside the package, hoisted) and ``text``, and
    every name the roots reached -> its name in the text (``names``; a seamed name -> what
    stands in for it)."""

    imports: list[str]
    text: str
    names: dict[Ref, str]
    imported_for: dict[str, Ref]  # each import -> the first definition that needs it
    why: dict[Ref, Ref | None]  # what first reached each name (None: a root)

    def name(self, ref: str | Ref) -> str:
        return self.names[Ref.parse(ref) if isinstance(ref, str) else ref]

    def chain(self, ref: Ref) -> list[Ref]:
        """How a root reaches ``ref``: the root first."""
        path = [ref]
        while (up := self.why.get(path[-1])) is not None and up not in path:
            path.append(up)
        return path[::-1]


def bundle(
    roots: list[str], seams: dict[str, Seam] | None = None, root: Path = SOURCE_ROOT
) -> Bundle:
    """The definitions ``roots`` (``module:name`` each) reach, copied into one file's code."""
    seams = {Ref.parse(k): v for k, v in (seams or {}).items()}
    modules = _Modules(root)
    for seamed in seams:  # a seam naming nothing (a definition moved or gone) stands for nothing
        modules.definition(seamed)
    units: dict[tuple, _Unit] = {}
    resolved: dict[Ref, tuple[tuple, str]] = {}  # name -> (its unit, the name there)
    why: dict[Ref, Ref | None] = {}
    pending: list[tuple[Ref, Ref | None]] = [(Ref.parse(r), None) for r in reversed(roots)]
    while pending:
        ref, parent = pending.pop()
        if ref in resolved:
            continue
        why[ref] = parent
        target = _through_seams(ref, seams)
        if isinstance(target, Seam):
            key = ("~", str(ref))
            units[key] = _Unit(key, ref, None, None, _Uses(), stub=target)
            resolved[ref] = (key, ref.name)
            continue
        found = modules.definition(target)
        module = modules[found.module]
        stmt = module.defs[found.name]
        key = (module.name, f"{stmt.lineno:06d}")
        if key not in units:
            uses = modules.uses(module, stmt)
            units[key] = _Unit(key, found, module, stmt, uses)
            pending += [(use.ref, found) for use in reversed(uses.uses)]
        resolved[ref] = (key, found.name)
    return _write(units, resolved, why)


def _through_seams(ref: Ref, seams: dict[Ref, Seam]) -> Ref | Seam:
    seen = set()
    while ref in seams and ref not in seen:
        seen.add(ref)
        if seams[ref].by is None:
            return seams[ref]
        ref = seams[ref].by
    return ref


def _write(units: dict[tuple, _Unit], resolved: dict, why: dict) -> Bundle:
    imported_for, bound = _hoisted(units.values())
    taken = set(dir(builtins)) | bound
    chosen = _choose_names(units, resolved, taken)
    text, module, previous = "", None, None
    for unit in _ordered(units, resolved):
        if unit.module is not module:
            module = unit.module
            summary = f": {module.summary}" if module and module.summary else ""
            head = f"--- {module.relative}{summary}" if module else _STUBS
            text += "\n\n\n" + _comment(head) + "\n\n"
        elif _constant(previous) and _constant(unit):
            text += "\n"  # consecutive constants of one module: no blank lines between
        else:
            text += "\n\n\n"
        text += _text(unit, resolved, chosen)
        previous = unit
    names = {ref: chosen[where] for ref, where in resolved.items()}
    imports = sorted(imported_for, key=lambda s: (s.startswith("from"), s))
    return Bundle(imports, text.lstrip("\n") + "\n", names, imported_for, why)


def _constant(unit: _Unit | None) -> bool:
    """A unit that is an assignment of one line."""
    stmt = unit and unit.stmt
    return isinstance(stmt, (ast.Assign, ast.AnnAssign)) and stmt.lineno == stmt.end_lineno


def _choose_names(units: dict[tuple, _Unit], resolved: dict, taken: set[str]) -> dict:
    """(unit key, name it defines) -> its name in the file: its own, unless another copied
    definition, an import or a builtin has it, or a variable around one of its uses (which
    would hide it): then qualified by its module (``training_build``)."""
    wanted: dict[str, list[tuple]] = {}
    for key, unit in sorted(units.items()):
        for name in unit.names:
            wanted.setdefault(name, []).append((key, name))
    hidden: dict[tuple, set[str]] = {}  # where -> names bound around its uses
    for unit in units.values():
        for use in unit.uses.uses:
            hidden.setdefault(resolved[use.ref], set()).update(use.shadowed)
    chosen, used = {}, set(taken)
    for name, wheres in sorted(wanted.items()):
        for where in wheres:
            candidate = name
            if len(wheres) > 1 or name in used or name in hidden.get(where, ()):
                candidate = _qualified(where)
            while candidate in used or candidate in hidden.get(where, ()):
                candidate += "_"
            chosen[where] = candidate
            used.add(candidate)
    return chosen


def _qualified(where: tuple) -> str:
    (module, line), name = where
    if module == "~":
        module = Ref.parse(line).module
    prefix = module.removeprefix(PACKAGE).strip(".").replace(".", "_") or "package"
    return f"{prefix}_{name}"


def _hoisted(units) -> tuple[dict[str, Ref], set[str]]:
    """The import statements of the outside names the units use (each -> the first unit's
    name), and the names they bind; one name bound to two things is an error."""
    statements: dict[str, Ref] = {}
    targets: dict[str, str] = {}
    for unit in sorted(units, key=lambda u: u.key):
        for name in sorted(unit.uses.externals):
            binding = unit.module.bindings[name]
            if targets.setdefault(name, binding.target) != binding.target:
                two = f"{targets[name]} and {binding.target}"
                raise InlineError(f"{unit.module.relative}: {name!r} names both {two}")
            statements.setdefault(binding.statement, unit.ref)
    return statements, set(targets)


def _ordered(units: dict[tuple, _Unit], resolved: dict) -> list[_Unit]:
    """Every unit after the units its module-level code uses (base classes, decorators,
    constants); otherwise by module, a module's dependencies first, then by line."""
    needs = {
        key: {resolved[use.ref][0] for use in unit.uses.uses if not use.lazy} - {key}
        for key, unit in units.items()
    }
    rank = _module_rank(units, resolved)
    waiting = sorted(units, key=lambda k: (rank[k[0]], k))
    done, order = set(), []
    while waiting:
        ready = next((k for k in waiting if needs[k] <= done), None)
        if ready is None:
            raise InlineError(f"module-level code in a cycle: {waiting}")
        waiting.remove(ready)
        done.add(ready)
        order.append(units[ready])
    return order


def _module_rank(units: dict[tuple, _Unit], resolved: dict) -> dict[str, int]:
    """Modules in post-order of the references between them (a module's dependencies first;
    stubs last)."""
    edges: dict[str, list[str]] = {}
    for key, unit in sorted(units.items()):
        for use in unit.uses.uses:
            edges.setdefault(key[0], []).append(resolved[use.ref][0][0])
    rank: dict[str, int] = {"~": -1}

    def visit(module: str) -> None:
        if module in rank:
            return
        rank[module] = -1
        for other in edges.get(module, []):
            visit(other)
        rank[module] = max(rank.values()) + 1

    for key in sorted(units):
        visit(key[0])
    rank["~"] = max(rank.values()) + 1
    return rank


def _comment(text: str, width: int = 99) -> str:
    lines, line = [], "#"
    for word in text.split():
        if len(line) + 1 + len(word) > width and line != "#":
            lines.append(line)
            line = "#"
        line = f"{line} {word}"
    return "\n".join([*lines, line])


def _text(unit: _Unit, resolved: dict, chosen: dict) -> str:
    """A unit's source, its references renamed; a stub that raises for a seam without a
    stand-in."""
    if unit.stub is not None:
        name = chosen[unit.key, unit.names[0]]
        message = f"{unit.key[1]} is not in this file: {unit.stub.why}"
        return f"def {name}(*args, **kwargs):\n    raise NotImplementedError({message!r})"
    module, stmt = unit.module, unit.stmt
    first = min([stmt.lineno, *(d.lineno for d in getattr(stmt, "decorator_list", []))])
    while first > 1 and module.lines[first - 2].lstrip().startswith("#"):
        first -= 1  # the comment right above the definition
    lines = [line.encode() for line in module.lines[first - 1 : stmt.end_lineno]]
    for (line, col, end_line, end_col), old, new in sorted(_renames(unit, resolved, chosen))[::-1]:
        a, b = line - first, end_line - first
        span = b"".join([lines[a][col:], *lines[a + 1 : b], lines[b][:end_col]])
        if a == b:
            span = lines[a][col:end_col]
        if b"".join(span.split()) != "".join(old.split()).encode():  # a position gone wrong
            raise InlineError(f"{module.relative}:{line}: {span!r} where {old!r} is")
        joined = lines[a][:col] + new.encode() + lines[b][end_col:]
        lines[a : b + 1] = [joined] + [b""] * (b - a)
    removed = set()
    for node in unit.uses.removed:
        removed.update(range(node.lineno - first, node.end_lineno - first + 1))
    kept = [line.decode() for i, line in enumerate(lines) if i not in removed]
    return "".join(kept).rstrip("\n")


def _renames(unit: _Unit, resolved: dict, chosen: dict) -> Iterator[tuple]:
    """((line, column, end line, end column), the text there, new text) of every use of a
    pipeline name and of the unit's own names, where the file names them otherwise."""
    for use in unit.uses.uses:
        node, new = use.node, chosen[resolved[use.ref]]
        if not (isinstance(node, ast.Name) and node.id == new):
            span = (node.lineno, node.col_offset, node.end_lineno, node.end_col_offset)
            yield span, ast.unparse(node), new
    stmt = unit.stmt
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        new = chosen[unit.key, stmt.name]
        if new != stmt.name:
            line = unit.module.lines[stmt.lineno - 1].encode()
            found = re.search(rb"\b(?:def|class)\s+(\w+)", line[stmt.col_offset :])
            start = stmt.col_offset + found.start(1)
            span = (stmt.lineno, start, stmt.lineno, start + len(stmt.name.encode()))
            yield span, stmt.name, new
        return
    targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
    for target in targets:
        for node in ast.walk(target):
            if isinstance(node, ast.Name) and chosen[unit.key, node.id] != node.id:
                span = (node.lineno, node.col_offset, node.end_lineno, node.end_col_offset)
                yield span, node.id, chosen[unit.key, node.id]
