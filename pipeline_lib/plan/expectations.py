"""An expectations file (``expectations/torch-<release>.yaml``), read once into typed data.

The file says which grids were run on a torch release (``measured``: each in the config's own
words, so the pipeline's grid code expands it exactly as it expands a config) and what the cells
of those grids gave (``findings``: cell patterns -> status and reason signature; a measured cell
no finding matches passed). The gate judges a cell by the file only when one of its grids holds
the cell (pipeline_lib.results.baseline).

The file is read before any job (config validation): YAML without aliases (a "billion laughs"
file expands without bound) or duplicate keys (PyYAML keeps the last), at most MAX_BYTES, and
every field of the right type, or an ExpectationsError of one line naming the file and the field.
Pure (no torch, no pandas).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    import pandas

from pipeline_lib import frameworks
from pipeline_lib.common import name_rule
from pipeline_lib.plan import axes
from pipeline_lib.plan.matrix_file import MatrixFileError, read_matrix
from pipeline_lib.verify.records import AXIS_COLUMNS, STATUSES

# The shipped files are under 64 KiB and nest 6 levels deep; a file beyond either is not one.
MAX_BYTES = 1 << 20
MAX_DEPTH = 32
# Columns a finding's ``cells`` may match on (every one is a column of matrix.parquet).
PATTERN_COLUMNS = (
    "model",
    "save_layout",
    "load_layout",
    "save_framework",
    "load_framework",
    "save_world_size",
    "load_world_size",
    *AXIS_COLUMNS,
    "save_torch_version",
    "load_torch_version",
)
# The config keys a measured grid may hold (what decides which cells a config has): an
# axis's key is its name.
GRID_KEYS = ("run", "models", "layouts", "pairs", "combine_axes", "checkpoints", *axes.AXES)
# An existing checkpoint's side of its cells (the matrix: save_framework existing, no mesh).
EXISTING: LayoutKey = ("existing", "", None, None)
# A layout as the matrix names its definition: framework, mesh ("2x2"), PP schedule and
# microbatches (None for other frameworks). Names are the user's: two configs may name one
# layout differently.
LayoutKey = tuple[str, str, str | None, int | None]


class ExpectationsError(ValueError):
    """The expectations file is unusable; the message (one line) names the file and field."""


# --- reading the YAML --------------------------------------------------------------------------
def _loader():
    from pipeline_lib.plan.schema import UniqueKeyLoader

    class StrictLoader(UniqueKeyLoader):
        """The config's loader (no duplicate keys), refusing aliases (an alias repeats a node,
        and nested ones repeat it exponentially: a YAML bomb) and nesting deeper than
        MAX_DEPTH (PyYAML's scanner spends time quadratic in the depth of flow collections:
        100,000 ``[`` took minutes)."""

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.YAMLError(
                    f"line {event.start_mark.line + 1}: alias *{event.anchor} (an expectations "
                    "file repeats nothing by reference: write the value out)"
                )
            return super().compose_node(parent, index)

        def fetch_flow_collection_start(self, token_class):
            self._check_depth(self.flow_level + len(self.indents))
            super().fetch_flow_collection_start(token_class)

        def add_indent(self, column):
            self._check_depth(self.flow_level + len(self.indents))
            return super().add_indent(column)

        def _check_depth(self, depth: int) -> None:
            if depth >= MAX_DEPTH:
                line = self.get_mark().line + 1
                raise yaml.YAMLError(f"line {line}: nested deeper than {MAX_DEPTH} levels")

    return StrictLoader


def read_strict_yaml(path: str | Path) -> Any:
    """The file's YAML (safe, no aliases, no duplicate keys, at most MAX_BYTES)."""
    from pipeline_lib.plan.schema import ConfigError

    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ExpectationsError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise ExpectationsError(f"{path}: larger than {MAX_BYTES} bytes: not an expectations file")
    try:
        return yaml.load(data.decode("utf-8"), Loader=_loader())
    except UnicodeDecodeError as exc:
        raise ExpectationsError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except (yaml.YAMLError, ConfigError) as exc:
        raise ExpectationsError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None


# --- typed fields ------------------------------------------------------------------------------
def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "a number" if isinstance(value, int | float) else type(value).__name__
    )


def _string(value: Any, where: str, empty: bool = True) -> str:
    if not isinstance(value, str) or (not empty and not value):
        raise ExpectationsError(f"{where}: expected a{'' if empty else ' non-empty'} string, "
                                f"got {_kind(value)}")  # fmt: skip
    return value


def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise ExpectationsError(f"{where}: expected a mapping, got {_kind(value)}")
    return value


def _list(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise ExpectationsError(f"{where}: expected a list, got {_kind(value)}")
    return value


def _strings(value: Any, where: str) -> tuple[str, ...]:
    """A string or a non-empty list of strings."""
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ExpectationsError(f"{where}: an empty list")
    return tuple(_string(v, f"{where}.{i}" if isinstance(value, list) else where, empty=False)
                 for i, v in enumerate(values))  # fmt: skip


def _unknown_keys(entry: dict, known, where: str) -> None:
    unknown = [str(k) for k in entry if k not in known]
    if unknown:
        raise ExpectationsError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))} (known: {', '.join(known)})"
        )


# --- findings ----------------------------------------------------------------------------------
def _pattern(value: Any, where: str) -> str:
    """A cell pattern: a string, or an integer (a world size)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _string(value, where, empty=False)


def _patterns(value: Any, where: str) -> dict[str, tuple[str, ...]]:
    out = {}
    for col, pats in _mapping(value, where).items():
        if col not in PATTERN_COLUMNS:
            raise ExpectationsError(
                f"{where}.{col}: not a cell column (one of {', '.join(PATTERN_COLUMNS)})"
            )
        listed = pats if isinstance(pats, list) else [pats]
        if not listed:
            raise ExpectationsError(f"{where}.{col}: an empty list")
        out[col] = tuple(_pattern(p, f"{where}.{col}") for p in listed)
    return out


@dataclass(frozen=True)
class Expectation:
    """One known finding: the cells it covers, what they give, why."""

    id: str
    cells: dict[str, tuple[str, ...]]
    status: str
    signature: str = "*"
    variant: str = ""  # the findings table's "variant" column (docs/findings.md)
    which: str = ""  # the cells in words: "saved by FSDP1, every model and load layout"
    why: str = ""  # the findings table's "why" column
    note: str = ""
    link: str = ""  # a reproducer or an upstream issue
    count: int | None = None  # cells of the measured grid
    by_design: bool = False  # a skip or limit of the pipeline, not a finding about torch

    def matches(self, row: dict) -> bool:
        return all(
            any(fnmatch.fnmatchcase(str(row.get(col)), p) for p in pats)
            for col, pats in self.cells.items()
        )

    @classmethod
    def parse(cls, entry: Any, where: str) -> Expectation:
        entry = _mapping(entry, where)
        _unknown_keys(entry, list(cls.__dataclass_fields__), where)
        for key in ("id", "cells", "status"):
            if key not in entry:
                raise ExpectationsError(f"{where}: no {key!r}")
        finding_id = _string(entry["id"], f"{where}.id", empty=False)
        if error := name_rule.name_error(finding_id):
            raise ExpectationsError(f"{where}.id: {error}")
        status = _string(entry["status"], f"{where}.status")
        if status not in STATUSES:
            raise ExpectationsError(f"{where}.status: {status!r} is not a status "
                                    f"({', '.join(STATUSES)})")  # fmt: skip
        text = {
            key: _string(entry[key], f"{where}.{key}")
            for key in ("signature", "variant", "which", "why", "note", "link")
            if key in entry
        }
        count = entry.get("count")
        if count is not None and (
            not isinstance(count, int) or isinstance(count, bool) or count < 0
        ):
            raise ExpectationsError(f"{where}.count: expected a count of cells, got {count!r}")
        by_design = entry.get("by_design", False)
        if not isinstance(by_design, bool):
            raise ExpectationsError(f"{where}.by_design: expected true or false, got "
                                    f"{_kind(by_design)}")  # fmt: skip
        return cls(id=finding_id, cells=_patterns(entry["cells"], f"{where}.cells"),
                   status=status, count=count, by_design=by_design, **text)  # fmt: skip


# --- measured grids ----------------------------------------------------------------------------
@cache
def _config_defaults() -> dict:
    """What a config gets for a key it leaves out (workflow/schemas/config.schema.yaml): a
    measured grid is read the same way."""
    from pipeline_lib.plan.schema import load_schema

    props = load_schema()["properties"]
    return {key: props[key]["default"] for key in GRID_KEYS if "default" in props.get(key, {})}


def _layout(spec: Any, where: str) -> LayoutKey:
    """A layout of a measured grid (a config's layout entry) as the matrix names it."""
    spec = _mapping(spec, where)
    _unknown_keys(spec, ("framework", "mesh", "schedule", "microbatches"), where)
    framework = _string(spec.get("framework"), f"{where}.framework", empty=False)
    if framework not in frameworks.names():
        raise ExpectationsError(f"{where}.framework: unknown framework {framework!r}")
    fw = frameworks.get(framework)
    mesh = _list(spec.get("mesh"), f"{where}.mesh")
    if len(mesh) != len(fw.mesh_dims) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in mesh
    ):
        raise ExpectationsError(f"{where}.mesh: framework {framework} needs {len(fw.mesh_dims)} "
                                f"positive size(s), got {mesh!r}")  # fmt: skip
    if fw.max_world_size is not None and math.prod(mesh) > fw.max_world_size:
        raise ExpectationsError(f"{where}.mesh: framework {framework} runs on at most "
                                f"{fw.max_world_size} process(es)")  # fmt: skip
    if not fw.pp_dim:
        if "schedule" in spec or "microbatches" in spec:
            raise ExpectationsError(f"{where}: framework {framework} has no pipeline stages")
        return framework, "x".join(map(str, mesh)), None, None
    schedule = _string(spec.get("schedule", frameworks.DEFAULT_PP_SCHEDULE), f"{where}.schedule")
    microbatches = spec.get("microbatches", frameworks.DEFAULT_MICROBATCHES)
    if not isinstance(microbatches, int) or isinstance(microbatches, bool) or microbatches < 1:
        raise ExpectationsError(f"{where}.microbatches: expected a positive integer")
    return framework, "x".join(map(str, mesh)), schedule, microbatches


def _axis_values(grid: dict, where: str) -> dict[str, list[str]]:
    """Axis -> its values, as a config's axis keys give them (defaults filled)."""
    values = {axis: list(_strings(grid[axis], f"{where}.{axis}")) for axis in axes.AXES}
    for axis, vals in values.items():
        for value in vals:
            if value not in axes.AXES[axis]:
                known = ", ".join(axes.AXES[axis])
                raise ExpectationsError(
                    f"{where}.{axis}: unknown {axis} {value!r} (known: {known})"
                )
    return values


def _pairs(setting: Any, layout_names: list[str], where: str) -> list[tuple[str, str]]:
    from pipeline_lib.plan.grid import layout_pairs

    if isinstance(setting, str):
        if setting not in ("all", "same", "none"):
            raise ExpectationsError(f"{where}.pairs: {setting!r} (all, same, none or a list)")
    else:
        for i, pair in enumerate(_list(setting, f"{where}.pairs")):
            if not (isinstance(pair, list) and len(pair) == 2):
                raise ExpectationsError(f"{where}.pairs.{i}: expected [save layout, load layout]")
            for j, name in enumerate(pair):
                if name not in layout_names:
                    raise ExpectationsError(f"{where}.pairs.{i}.{j}: unknown layout {name!r}")
    return layout_pairs({"pairs": setting, "layouts": dict.fromkeys(layout_names)})


@dataclass(frozen=True)
class MeasuredGrid:
    """One grid a file was measured on: what ran (``run``, in words) and its cells, expanded
    by the pipeline's own grid code (pipeline_lib.plan.axes.variants, pipeline_lib.plan.grid)."""

    run: str
    models: frozenset[str]
    layout_pairs: frozenset[tuple[LayoutKey, LayoutKey]]
    variants: frozenset[axes.Variant]

    def holds(self, model: str, save: LayoutKey, load: LayoutKey, variant: axes.Variant) -> bool:
        return (
            model in self.models
            and (save, load) in self.layout_pairs
            and (variant in self.variants)
        )

    @property
    def size(self) -> int:
        return len(self.models) * len(self.layout_pairs) * len(self.variants)

    @classmethod
    def parse(cls, entry: Any, where: str) -> MeasuredGrid:
        entry = _mapping(entry, where)
        if renamed := axes.renamed_keys(entry):
            raise ExpectationsError(f"{where}.{renamed[0]}")
        _unknown_keys(entry, GRID_KEYS, where)
        for key in ("run", "models", "layouts"):
            if key not in entry:
                raise ExpectationsError(f"{where}: no {key!r}")
        grid = {**_config_defaults(), **entry}
        run = _string(grid["run"], f"{where}.run", empty=False)
        models = _strings(grid["models"], f"{where}.models")
        layouts = {
            str(name): _layout(spec, f"{where}.layouts.{name}")
            for name, spec in _mapping(grid["layouts"], f"{where}.layouts").items()
        }
        if not layouts:
            raise ExpectationsError(f"{where}.layouts: no layouts")
        pairs = _pairs(grid["pairs"], list(layouts), where)
        if grid["combine_axes"] not in ("product", "one_at_a_time", "pairwise"):
            raise ExpectationsError(f"{where}.combine_axes: {grid['combine_axes']!r} (product, "
                                    "one_at_a_time or pairwise)")  # fmt: skip
        existing = "checkpoints" in entry and _strings(entry["checkpoints"], f"{where}.checkpoints")
        config = {**_axis_values(grid, where), "combine_axes": grid["combine_axes"]}
        return cls(
            run=run,
            models=frozenset(models),
            # Existing checkpoints (their names, as the config's checkpoints): each model's
            # checkpoint loaded under every layout.
            layout_pairs=frozenset((layouts[s], layouts[d]) for s, d in pairs)
            | {(EXISTING, key) for key in layouts.values() if existing},
            variants=frozenset(axes.variants(config)),
        )


# --- the file ----------------------------------------------------------------------------------
TOP_KEYS = ("torch", "measured", "findings")


@dataclass(frozen=True)
class Expectations:
    """An expectations file: the releases it was measured on, the grids run on them, findings."""

    path: str
    torch: tuple[str, ...]
    measured: tuple[MeasuredGrid, ...]
    findings: tuple[Expectation, ...] = field(default_factory=tuple)

    def measured_cell(self, model: str, save: LayoutKey, load: LayoutKey,
                      variant: axes.Variant) -> bool:  # fmt: skip
        return any(grid.holds(model, save, load, variant) for grid in self.measured)

    def finding(self, row: dict) -> Expectation | None:
        """The first finding that matches the cell (None: the cell passed)."""
        return next((f for f in self.findings if f.matches(row)), None)


def parse(data: Any, path: str) -> Expectations:
    data = _mapping(data, str(path))
    if "covers" in data:
        raise ExpectationsError(
            f"{path}: covers: replaced by 'measured', the grids the file was measured on "
            "(docs/regression-gate.md)"
        )
    _unknown_keys(data, TOP_KEYS, str(path))
    for key in TOP_KEYS:
        if key not in data:
            raise ExpectationsError(f"{path}: no {key!r} (an expectations file has "
                                    f"{', '.join(TOP_KEYS)})")  # fmt: skip
    torch = _strings(data["torch"], f"{path}: torch")
    grids = _list(data["measured"], f"{path}: measured")
    if not grids:
        raise ExpectationsError(f"{path}: measured: no grid (the file would judge nothing)")
    measured = tuple(MeasuredGrid.parse(g, f"{path}: measured.{i}") for i, g in enumerate(grids))
    findings = tuple(
        Expectation.parse(entry, f"{path}: findings.{i}")
        for i, entry in enumerate(_list(data["findings"], f"{path}: findings"))
    )
    seen: dict[str, int] = {}
    for i, finding in enumerate(findings):
        if finding.id in seen:
            raise ExpectationsError(
                f"{path}: findings.{i}.id: {finding.id!r} repeats findings.{seen[finding.id]}"
            )
        seen[finding.id] = i
    return Expectations(str(path), torch, measured, findings)


def load_expectations(path: str | Path) -> Expectations:
    """The file, read and typed (ExpectationsError: one line naming the file and field)."""
    return parse(read_strict_yaml(path), str(path))


def layout_key(row: dict, side: str) -> LayoutKey:
    """A matrix row's layout of one side ("save" or "load") as a measured grid names it."""
    microbatches = row.get(f"{side}_microbatches")
    schedule = row.get(f"{side}_pp_schedule")
    return (
        str(row.get(f"{side}_framework")),
        str(row.get(f"{side}_mesh")),
        schedule if isinstance(schedule, str) else None,
        None if microbatches is None or _is_nan(microbatches) else int(microbatches),
    )


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def load_baseline(path: str | Path) -> Expectations | pandas.DataFrame:
    """An expectations file (.yaml/.yml) or a previous matrix (.parquet); ValueError (one line
    naming the file and field) when it cannot be one."""
    if str(path).endswith(".parquet"):
        matrix = read_matrix(path, "baseline matrix")
        if not len(matrix):
            raise MatrixFileError(f"{path}: the baseline matrix has no cells: nothing to compare")
        return matrix
    return load_expectations(path)


def content_error(path: str | Path) -> str | None:
    """Why the file cannot be a baseline (one line), or None: read and typed whole, before any
    job runs (config validation)."""
    try:
        load_baseline(path)
    except (ExpectationsError, MatrixFileError) as exc:
        return str(exc)
    return None
