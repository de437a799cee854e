"""The Snakefile's view of the grid: validated config -> rule inputs, params and resources.

Thin adapters only; the expansion itself is pipeline_lib.grid.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

from pipeline_lib import grid
from pipeline_lib.config import validate

# Progress marks of a save item (build, train, reference, state dict, save, resume, files
# check: pipeline_lib.worker).
SAVE_STEPS = 7


class Plan:
    def __init__(self, config: dict, basedir: str, announce: bool = False):
        # Refuse a bad config before any job starts; fill in the defaults for the rules.
        validated = validate(config, source="config")
        config.clear()
        config.update(validated)
        self.config = validated
        self.basedir = basedir
        self.layouts = grid.layouts(validated)
        if announce:  # the main Snakemake process (a dry run too), not every cluster job
            print(self.disk_line(), file=sys.stderr)

    def disk_line(self) -> str:
        from pipeline_lib.disk import grid_bytes

        return f"dcp-matrix: the grid writes {grid_bytes(self.config)}"

    def wildcard_pattern(self, key: str) -> str:
        return "|".join(re.escape(name) for name in self.config[key])

    @property
    def version_root_pattern(self) -> str:
        """The {version_root} wildcard of the matrix rules: results, or results/torch/<version>
        (grid.version_root)."""
        return "|".join(re.escape(root) for root in grid.version_roots(self.config))

    def _version(self, wildcards) -> str | None:
        return grid.version_roots(self.config)[wildcards.version_root]

    @property
    def env_dir(self) -> str:
        return self.config["run"]["torch_env_dir"]

    def torch_requirement(self, wildcards) -> str:
        return self.config["torch_versions"][wildcards.version]

    def torch_env_prefix(self, wildcards) -> str:
        return grid.env_dir(self.config, wildcards.version)

    def torch_env_inputs(self, wildcards) -> list[str]:
        version = self._version(wildcards)
        return [] if version is None else [grid.env_marker(self.config, version)]

    def python(self, wildcards) -> str:
        version = self._version(wildcards)
        return sys.executable if version is None else grid.env_python(self.config, version)

    @property
    def grid_json(self) -> str:
        """The validated config: a job's CLI expands its own spec from it (grid.*_job_spec)."""
        return json.dumps(self.config)

    # Output patterns of the matrix jobs: one record (and save folder) per item.
    @property
    def save_records(self) -> list[str]:
        return grid.save_outputs(self.config, "{version_root}", "{layout}")[0]

    @property
    def save_dirs(self) -> list[str]:
        return grid.save_outputs(self.config, "{version_root}", "{layout}")[1]

    @property
    def load_outputs(self) -> list[str]:
        return grid.load_outputs(self.config, "{version_root}", "{layout}")

    def load_inputs(self, wildcards) -> list[str]:
        return grid.load_inputs(
            self.config, wildcards.version_root, wildcards.layout
        ) + self.torch_env_inputs(wildcards)

    def load_records(self) -> list[str]:
        return [
            record
            for version_root, layout in grid.load_jobs(self.config)
            for record in grid.load_outputs(self.config, version_root, layout)
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
            grid.save_record_path(cell.save_model, cell.save, cell.root),
            grid.save_dir(cell.save_model, cell.save, cell.root),
        ]

    def fault_load_threads(self, wildcards) -> int:
        return self.layouts[grid.fault_cell(self.config, wildcards.fault_id).load].world_size

    def fault_records(self) -> list[str]:
        return [cell.load_record_path for cell in grid.fault_cells(self.config)]

    def ranks(self, wildcards) -> int:
        return self.layouts[wildcards.layout].world_size

    def threads(self, wildcards) -> int:
        return self.ranks(wildcards)

    # --- Slurm resources (profiles/slurm; the local executor ignores them) ------------------
    # A job of world size W runs on ceil(W / run.gpus_per_node) nodes, the same number of
    # ranks (and GPUs) on each; run.gpus_per_node = 0 (CPU jobs) keeps every rank on one node.
    # Values of None leave a resource unset.
    def _world(self, wildcards) -> int:
        layout = getattr(wildcards, "layout", None)
        if layout is None:  # load_fault_checkpoint: the fault cell's load layout
            return self.fault_load_threads(wildcards)
        return self.layouts[layout].world_size

    def _placement(self, wildcards) -> tuple[int, int, int]:
        """(nodes, ranks per node, GPUs per node) of the job."""
        world, gpus_per_node = self._world(wildcards), self.config["run"]["gpus_per_node"]
        if not gpus_per_node:
            return 1, world, 0
        nodes = -(-world // gpus_per_node)
        return nodes, world // nodes, world // nodes

    def slurm_nodes(self, wildcards) -> int:
        return self._placement(wildcards)[0]

    def slurm_tasks(self, wildcards) -> int | None:
        """One task per node (a torchrun agent each) for a multi-node job."""
        nodes = self._placement(wildcards)[0]
        return nodes if nodes > 1 else None

    def slurm_mpi(self, wildcards) -> str | None:
        """Multi-node jobs: the plugin runs the command in the batch script unwrapped and the
        launcher calls srun itself (pipeline_lib.launcher)."""
        return "srun" if self._placement(wildcards)[0] > 1 else None

    def slurm_gres(self, wildcards) -> str | None:
        """``--gres=gpu:N``: N GPUs on every node of the job, one per rank."""
        gpus = self._placement(wildcards)[2]
        return f"gpu:{gpus}" if gpus else None

    def slurm_tasks_per_gpu(self, wildcards) -> int | None:
        """0 for GPU jobs: no ``--ntasks-per-gpu`` (which would start the command per GPU)."""
        return 0 if self._placement(wildcards)[2] else None

    def slurm_cpus_per_task(self, wildcards) -> int | None:
        """Multi-node jobs: one CPU per rank of a node (one-node jobs: ``threads``)."""
        nodes, per_node, _ = self._placement(wildcards)
        return per_node if nodes > 1 else None

    def slurm_mem_mb(self, wildcards) -> int:
        """Memory per node: 1 GB for the agent and the job's own checks, 2 GB per rank."""
        return 1000 + 2000 * self._placement(wildcards)[1]

    def slurm_runtime(self, wildcards, attempt) -> int:
        """Minutes: twice the watchdog's worst case (start-up taking ``run.startup_timeout_s``;
        training, the save and every checkpoint a load job verifies, each taking
        ``run.cell_timeout_s``), plus 10; more on
        each retry. Every item of a save job reports SAVE_STEPS steps, a load job one per
        source; a save job of a layout gets the limit of that layout's load job if longer."""
        layout = getattr(wildcards, "layout", None)
        steps = SAVE_STEPS
        if layout is not None and getattr(wildcards, "fault_id", None) is None:
            per_item = max(SAVE_STEPS, len(grid.sources_of(self.config, layout)))
            steps = len(grid.items(self.config)) * per_item
        run = self.config["run"]
        worst_s = run["startup_timeout_s"] + (steps + 2) * run["cell_timeout_s"]
        return (10 + -(-2 * int(worst_s) // 60)) * attempt

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
