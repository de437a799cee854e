"""The config's schema (workflow/schemas/config.schema.yaml), how a YAML input is read (a key
given twice refused), and which of a config's keys are the jobs' inputs. Pure (no torch); the
lowest module of the plan: config validation, the grid and expectations files all read it."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """The config is invalid; the message names the field."""


def load_schema() -> dict:
    """The config schema (a copy: the caller may change it)."""
    return copy.deepcopy(_parsed_schema())


@functools.cache
def _parsed_schema() -> dict:
    """Parsed once per process: PyYAML's pure-Python parser takes 50-140 ms on it, and a
    process validates many configs (a test session thousands)."""
    return yaml.safe_load(SCHEMA_PATH.read_text())


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: PyYAML's own error says so
                break
            if first is not None:
                raise ConfigError(f"line {line}: duplicate key {key!r} (first on line {first})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(text: str, source: str) -> Any:
    """YAML text as PyYAML's safe loader reads it, but refusing duplicate keys."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: cannot read config: {' '.join(str(exc).split())}") from None


# Keys that change no job's work: what a finished run is compared with.
NOT_JOB_INPUTS = ("baseline",)


def job_inputs(config: dict) -> dict:
    """The config without the keys no job reads (a baseline changes the gate, not the cells)."""
    return {k: v for k, v in config.items() if k not in NOT_JOB_INPUTS}


# Keys jobs read that change no result: ``reuse`` decides which units run again, not their
# verdicts (a reused row and a recomputed one carry the same hash).
NOT_RESULT_INPUTS = ("reuse",)


def config_hash(config: dict) -> str:
    """A short, stable hash of the validated config (recorded in every row), without the keys
    no job reads and those that change no result."""
    results = {k: v for k, v in job_inputs(config).items() if k not in NOT_RESULT_INPUTS}
    blob = json.dumps(results, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
