"""Load and validate a grid config: JSON schema first, then the checks a schema cannot express.

Every error names the field (``layouts.tp_2.mesh``) or the file, and is raised before any job runs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from pipeline_lib import axes, faults, frameworks, models

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """The config is invalid; the message names the field."""


def load_schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def load(path: str | Path) -> dict:
    """Read a YAML config file and validate it (defaults filled in)."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    return validate(raw, source=str(path))


def validate(raw: Any, source: str = "config") -> dict:
    """Return a validated copy of ``raw`` with defaults filled in, or raise ConfigError."""
    schema = load_schema()
    config = copy.deepcopy(raw) if raw is not None else {}
    if isinstance(config, dict):
        _fill_defaults(config, schema)
    errors = sorted(
        jsonschema.Draft202012Validator(schema).iter_errors(config), key=lambda e: list(e.path)
    )
    if errors:
        lines = [f"{source}: {_field(e.absolute_path)}: {e.message}" for e in errors]
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines))
    _check_semantics(config, source)
    return config


def config_hash(config: dict) -> str:
    """A short, stable hash of the validated config (recorded in every row)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _field(path) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _fill_defaults(node: dict, schema: dict) -> None:
    for key, sub in schema.get("properties", {}).items():
        if key not in node and "default" in sub:
            node[key] = copy.deepcopy(sub["default"])
        if isinstance(node.get(key), dict) and "properties" in sub:
            _fill_defaults(node[key], sub)


def _check_semantics(config: dict, source: str) -> None:
    errors = []
    if not config["models"] and not config["faults"]:
        errors.append("models: the grid is empty (no models and no faults)")
    known_models = models.names()
    for i, name in enumerate(config["models"]):
        if error := _model_error(name, known_models):
            errors.append(f"models.{i}: {error}")
    known_frameworks = frameworks.names()
    max_dp = 1
    for name, layout in config["layouts"].items():
        where = f"layouts.{name}"
        if layout["framework"] not in known_frameworks:
            errors.append(
                f"{where}.framework: unknown framework {layout['framework']!r} "
                f"(known: {', '.join(known_frameworks)})"
            )
            continue
        fw = frameworks.get(layout["framework"])
        mesh = layout["mesh"]
        if len(mesh) != len(fw.mesh_dims):
            errors.append(
                f"{where}.mesh: framework {fw.name} needs {len(fw.mesh_dims)} mesh dim(s) "
                f"({', '.join(fw.mesh_dims)}), got {mesh}"
            )
            continue
        world = math.prod(mesh)
        if fw.max_world_size is not None and world > fw.max_world_size:
            errors.append(
                f"{where}.mesh: framework {fw.name} runs on at most {fw.max_world_size} "
                f"process(es), mesh {mesh} has {world}"
            )
        gpus_per_node = config["run"]["gpus_per_node"]
        if gpus_per_node and world % math.ceil(world / gpus_per_node):
            nodes = math.ceil(world / gpus_per_node)
            errors.append(
                f"{where}.mesh: world size {world} does not split evenly over {nodes} nodes of "
                f"run.gpus_per_node={gpus_per_node} (every node runs the same number of ranks)"
            )
        dp = math.prod(s for s, d in zip(mesh, fw.mesh_dims, strict=True) if d != fw.tp_dim)
        max_dp = max(max_dp, dp)
    errors += _unknown_pair_names(config, "pairs", config["layouts"], "layout")
    errors += _unknown_pair_names(
        config, "version_pairs", config["torch_versions"], "torch version"
    )
    single_optimizer = isinstance(config["train"]["optimizer"], str)
    for axis, values in axes.axis_values(config).items():
        key, known = axes.CONFIG_KEYS[axis], axes.AXES[axis]
        for i, value in enumerate(values):
            if value not in known:
                where = key if axis == "optimizer" and single_optimizer else f"{key}.{i}"
                errors.append(f"{where}: unknown {axis} {value!r} (known: {', '.join(known)})")
    known_faults = ["all", *faults.FAULTS]
    for i, entry in enumerate(config["faults"]):
        if entry["fault"] not in known_faults:
            known = ", ".join(known_faults)
            errors.append(f"faults.{i}.fault: unknown fault {entry['fault']!r} (known: {known})")
        if entry["model"] not in known_models:
            errors.append(f"faults.{i}.model: unknown model {entry['model']!r}")
        for key in ("save", "load"):
            if entry[key] not in config["layouts"]:
                errors.append(f"faults.{i}.{key}: unknown layout {entry[key]!r}")
    if config["train"]["global_batch"] < max_dp:
        errors.append(
            f"train.global_batch: {config['train']['global_batch']} is smaller than the largest "
            f"data-parallel degree {max_dp}; every data-parallel rank needs at least one sample"
        )
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(f"{source}: {e}" for e in errors))


def _model_error(name: str, known_models: list[str]) -> str | None:
    """Why ``name`` is not a usable model: unknown, or an import path that does not import or
    lacks the contract (imports the user's module, and so torch, now: before any job runs)."""
    if models.is_import_path(name):
        try:
            models.get(name)
        except models.UserModelError as exc:
            return str(exc)
        return None
    if name not in known_models:
        known = ", ".join(known_models)
        return f"unknown model {name!r} (known: {known}; or your own: package.module:callable)"
    return None


def _unknown_pair_names(config: dict, key: str, known, what: str) -> list[str]:
    """Errors for the names in a list of [save, load] pairs (``pairs``, ``version_pairs``)."""
    pairs = config[key] if isinstance(config[key], list) else []
    return [
        f"{key}.{i}.{j}: unknown {what} {name!r}"
        for i, pair in enumerate(pairs)
        for j, name in enumerate(pair)
        if name not in known
    ]
