"""The Snakefile's view of the grid: validated config -> rule inputs, params and resources.

Thin adapters only; the expansion itself is pipeline_lib.grid.
"""

from __future__ import annotations

import json
import re
import subprocess

from pipeline_lib import grid
from pipeline_lib.config import validate


class Plan:
    def __init__(self, config: dict, basedir: str):
        # Refuse a bad config before any job starts; fill in the defaults for the rules.
        validated = validate(config, source="config")
        config.clear()
        config.update(validated)
        self.config = validated
        self.basedir = basedir
        self.layouts = grid.layouts(validated)

    def wildcard_pattern(self, key: str) -> str:
        return "|".join(re.escape(name) for name in self.config[key])

    def save_spec(self, wildcards) -> str:
        return json.dumps(grid.save_spec(self.config, wildcards.model, wildcards.layout))

    def load_spec(self, wildcards) -> str:
        return json.dumps(grid.load_spec(self.config, wildcards.model, wildcards.layout))

    def load_inputs(self, wildcards) -> list[str]:
        return [
            path
            for src in grid.sources_of(self.config, wildcards.layout)
            for path in (
                grid.save_record(wildcards.model, src),
                grid.save_dir(wildcards.model, src),
            )
        ]

    def load_records(self) -> list[str]:
        return [
            grid.load_record(model, layout)
            for model in self.config["models"]
            for layout in grid.load_layouts(self.config)
        ]

    def targets(self) -> list[str]:
        """What ``rule all`` asks for: the matrix if the grid has cells, the fault campaign's
        verdict if the config has faults."""
        targets = []
        if self.config["models"]:
            targets += ["results/matrix.parquet", "results/tensors.parquet"]
        if self.config["faults"]:
            targets += ["results/selftest.md", "results/selftest.ok"]
        return targets

    # --- the fault campaign ---------------------------------------------------------------
    def fault_save_spec(self, wildcards) -> str:
        cell = grid.fault_cell(self.config, wildcards.fault_id)
        return json.dumps(grid.fault_save_spec(self.config, cell))

    def fault_load_spec(self, wildcards) -> str:
        cell = grid.fault_cell(self.config, wildcards.fault_id)
        return json.dumps(grid.fault_load_spec(self.config, cell))

    def fault_load_inputs(self, wildcards) -> list[str]:
        cell = grid.fault_cell(self.config, wildcards.fault_id)
        return [
            grid.save_record(cell.save_model, cell.save, cell.root),
            grid.save_dir(cell.save_model, cell.save, cell.root),
        ]

    def fault_load_threads(self, wildcards) -> int:
        return self.layouts[grid.fault_cell(self.config, wildcards.fault_id).load].world_size

    def fault_records(self) -> list[str]:
        return [cell.load_record for cell in grid.fault_cells(self.config)]

    def ranks(self, wildcards) -> int:
        return self.layouts[wildcards.layout].world_size

    def threads(self, wildcards) -> int:
        return self.ranks(wildcards)

    @property
    def git_commit(self) -> str:
        try:
            out = subprocess.run(
                ["git", "-C", self.basedir, "rev-parse", "--short=12", "HEAD"],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            return out.stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"
