"""The Snakefile's view of the grid: validated config -> rule inputs, params and resources.

Thin adapters only; the expansion itself is pipeline_lib.plan.grid. Each rule has callables of its
own, named after it (``save_job_*``, ``load_job_*``, ``fault_save_*``, ``fault_load_*``): none
guesses its rule from the wildcards it gets. Each wildcard is one path segment. Wildcards of the
matrix rules: ``{layout}``, and ``{version}`` for those of a torch_versions environment (their
root results/torch/{version}; without it, the pipeline's own: results); of the fault rules:
``{fault_id}`` (and the save rule's ``{model}``, ``{layout}``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from pipeline_lib.plan import grid
from pipeline_lib.plan.config import checkpoint_files, job_inputs, validate

# Progress marks of a save item (build, train, reference, state dict, save, resume, files
# check: pipeline_lib.job.worker).
SAVE_STEPS = 7
# How the main Snakemake process tells a cluster job's own Snakemake what the run forces: that
# one is started with --force and its own target job only (Slurm's sbatch --export=ALL passes
# the main process's environment on).
FORCED_ENV = "DCP_MATRIX_FORCED"


@dataclass(frozen=True)
class Forced:
    """What a Snakemake run forces to run: every rule (``-F``/``--forceall``), or the rules and
    files ``-R``/``--forcerun`` names and, with ``-f``/``--force``, the targets. A forced job
    re-verifies: it runs every unit and reuses nothing (pipeline_lib.job.reuse)."""

    every: bool = False
    names: frozenset[str] = frozenset()  # rule names and output files (relative paths)

    @classmethod
    def of(cls, settings) -> Forced:
        """From Snakemake's DAG settings (``workflow.dag_settings``; None: nothing forced)."""
        if settings is None:
            return cls()
        names = set(settings.forcerun) | (set(settings.targets) if settings.forcetargets else set())
        return cls(bool(settings.forceall), frozenset(os.path.relpath(n) for n in names))

    @classmethod
    def of_process(cls, settings, main: bool) -> Forced:
        """The main process's answer, which it passes on (FORCED_ENV); a cluster job's own
        Snakemake reads it (its own settings force its one job: they tell nothing)."""
        if not main:
            return cls.from_json(os.environ.get(FORCED_ENV))
        forced = cls.of(settings)
        os.environ[FORCED_ENV] = forced.to_json()
        return forced

    def to_json(self) -> str:
        return json.dumps({"every": self.every, "names": sorted(self.names)})

    @classmethod
    def from_json(cls, text: str | None) -> Forced:
        data = json.loads(text) if text else {}
        return cls(bool(data.get("every")), frozenset(data.get("names", ())))

    def job(self, rule: str, outputs: Iterable[str]) -> bool:
        """Whether this run forces the job of ``rule`` that writes ``outputs``."""
        named = {rule, *(os.path.relpath(o) for o in outputs)}
        return self.every or not self.names.isdisjoint(named)


class ReuseFlag:
    """A job's ``--no-reuse`` (its rule forced) or nothing, as a rule param. Not a ``str`` on
    purpose: Snakemake records a job's params of built-in types and reruns the job when they
    change, but leaves others out (snakemake.persistence: UNREPRESENTABLE), so a forced run
    does not leave its jobs' params 'changed' for the next run."""

    def __init__(self, off: bool):
        self.off = off

    def __str__(self) -> str:
        return "--no-reuse" if self.off else ""


class Plan:
    def __init__(
        self,
        config: dict,
        basedir: str,
        announce: bool = False,
        dag_settings: Callable[[], Any] | None = None,
    ) -> None:
        """``config``: Snakemake's config, left as it is. Refuses a bad config before any job
        starts; ``self.config`` is the validated copy, every default filled in (what the rules
        read: the Snakefile binds ``config`` to it). ``announce``: the main Snakemake process
        (a dry run too), not a cluster job's own. ``dag_settings``: returns Snakemake's
        (``workflow.dag_settings``, set only after the Snakefile is read), which say what the
        run forces."""
        self.config = validate(config, source="config")
        self.basedir = basedir
        self.layouts = grid.layouts(self.config)
        self.main = announce
        self._dag_settings = dag_settings or (lambda: None)
        if announce:
            print(self.disk_line(), file=sys.stderr)

    @cached_property
    def forced(self) -> Forced:
        """What this run forces (read when the first job's params are, once the settings are
        there)."""
        return Forced.of_process(self._dag_settings(), main=self.main)

    def disk_line(self) -> str:
        """The disk estimate; a model that cannot be built leaves it out (that model's cells
        run and record why they fail)."""
        from pipeline_lib.plan.disk_estimate import ModelBuildError, grid_bytes

        try:
            return f"dcp-matrix: the grid writes {grid_bytes(self.config)}"
        except ModelBuildError as exc:
            return f"dcp-matrix: no disk estimate: {exc}"

    def wildcard_pattern(self, key: str) -> str:
        return "|".join(re.escape(name) for name in self.config[key])

    @property
    def model_pattern(self) -> str:
        """The {model} wildcard: the grid's models and those of the fault campaign's cells
        (a foreign_checkpoint cell saves another model)."""
        cells = grid.fault_cells(self.config)
        names = dict.fromkeys([*self.config["models"], *(c.save_model for c in cells)])
        return "|".join(re.escape(name) for name in names)

    @property
    def checkpoint_pattern(self) -> str:
        """The {checkpoint} wildcard: the names of the existing checkpoints (none: nothing)."""
        return self.wildcard_pattern("checkpoints") or "(?!)"

    def existing_files(self, wildcards) -> list[str]:
        """Every file of the existing checkpoint's folder: one rewritten, the checkpoint's
        import job runs again (and imports again: pipeline_lib.job.reuse). Snakemake reads ``{…}``
        in an input as a wildcard (doubling the braces does not escape an input function's
        path): the config check refuses such a name first (config.checkpoint_folder_error)."""
        folder = self.config["checkpoints"][wildcards.checkpoint]["path"]
        return [str(p) for p in checkpoint_files(folder)]

    def targets(self) -> list[str]:
        """What ``rule all`` asks for: the matrix if the grid has cells, the fault campaign's
        verdict if the config has faults."""
        targets = []
        if self.config["models"]:
            targets += ["results/matrix.parquet", "results/tensors.parquet"]
        if self.config["faults"]:
            targets += ["results/selftest.md", "results/selftest.ok"]
        return targets

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

    # --- torch environments (rule torch_env) ------------------------------------------------
    @property
    def env_dir(self) -> str:
        return self.config["run"]["torch_env_dir"]

    def torch_requirement(self, wildcards) -> str:
        return self.config["torch_versions"][wildcards.version]

    def torch_env_prefix(self, wildcards) -> str:
        return grid.env_dir(self.config, wildcards.version)

    @property
    def torch_env_packages(self) -> str:
        """The pinned packages an environment gets besides torch: a change rebuilds it."""
        from pipeline_lib.plan.torch_envs import JOB_PACKAGES, pinned

        return " ".join(pinned(JOB_PACKAGES))

    # --- the matrix jobs (rules save_checkpoints, load_checkpoints, *_in_torch_env) --------
    @property
    def item_folders(self) -> dict[str, list[str]]:
        """Where a matrix job's items write below its root, for the rules' outputs
        (``expand(..., zip, **item_folders)``): each item's variant folder ("" or
        "/axes/<variant id>", grid.variant_dir) and model, in the job's order."""
        items = grid.items(self.config)
        return {
            "axes": [grid.variant_dir(variant) for variant, _ in items],
            "model": [model for _, model in items],
        }

    @staticmethod
    def _version(wildcards) -> str | None:
        """The job's torch_versions environment ({version}), None for the pipeline's own."""
        return getattr(wildcards, "version", None)

    def job_root(self, wildcards) -> str:
        """The job's version root: results, or results/torch/{version}."""
        return grid.version_root(self._version(wildcards))

    def job_env_inputs(self, wildcards) -> list[str]:
        """The torch environment a job runs in (none for the pipeline's own)."""
        version = self._version(wildcards)
        return [] if version is None else [grid.env_marker(self.config, version)]

    def job_python(self, wildcards) -> str:
        version = self._version(wildcards)
        return sys.executable if version is None else grid.env_python(self.config, version)

    @property
    def grid_json(self) -> str:
        """The validated config: a job's CLI expands its own spec from it (grid.*_job_spec).
        Without the keys no job reads: setting a baseline must not re-run a finished job."""
        return json.dumps(job_inputs(self.config))

    @property
    def code_and_environment(self) -> str:
        """The project's code version and this interpreter's environment
        (pipeline_lib.common.fingerprint): a matrix job runs again when either changed; it then
        reruns only the units whose inputs key changed (pipeline_lib.job.reuse). (A
        torch_versions environment is a job input of its own.)"""
        from pipeline_lib.common.fingerprint import code_version, environment

        return f"code {code_version()[:16]}, environment {environment()[:16]}"

    # A forced job reruns every unit (--no-reuse); the config key reuse is in the grid param.
    def save_job_reuse(self, wildcards) -> ReuseFlag:
        outputs = grid.save_outputs(self.config, self.job_root(wildcards), wildcards.layout)
        return ReuseFlag(self.forced.job(self._rule("save_checkpoints", wildcards), outputs))

    def load_job_reuse(self, wildcards) -> ReuseFlag:
        outputs = grid.load_outputs(self.config, self.job_root(wildcards), wildcards.layout)
        return ReuseFlag(self.forced.job(self._rule("load_checkpoints", wildcards), outputs))

    def _rule(self, rule: str, wildcards) -> str:
        """The rule of a matrix job: ``rule`` or, in a torch_versions environment, its copy."""
        return rule if self._version(wildcards) is None else f"{rule}_in_torch_env"

    def import_reuse(self, wildcards) -> ReuseFlag:
        output = grid.existing_record_path(wildcards.checkpoint)
        return ReuseFlag(self.forced.job("import_checkpoint", [output]))

    def job_ranks(self, wildcards) -> int:
        """World size of the job of {layout} (also the fault campaign's save jobs)."""
        return self.layouts[wildcards.layout].world_size

    def load_job_inputs(self, wildcards) -> list[str]:
        return grid.load_inputs(
            self.config, self.job_root(wildcards), wildcards.layout
        ) + self.job_env_inputs(wildcards)

    def load_record_paths(self) -> list[str]:
        """Every record of every load job (rule aggregate)."""
        return [
            record
            for version_root, layout in grid.load_jobs(self.config)
            for record in grid.load_outputs(self.config, version_root, layout)
        ]

    def _job_steps(self, wildcards) -> int:
        """Progress marks of a matrix job of {layout}: SAVE_STEPS per item of a save job, one
        per source of a load job; a save job gets the count of its layout's load job if
        larger."""
        per_item = max(SAVE_STEPS, len(grid.sources_of(self.config, wildcards.layout)))
        return len(grid.items(self.config)) * per_item

    @property
    def job_resources(self) -> dict[str, Callable]:
        """The resources of a matrix job (save_checkpoints, load_checkpoints)."""
        return self._resources(self.job_ranks, self._job_steps)

    # --- the fault campaign (rules save_fault_checkpoint, load_fault_checkpoint, ...) -------
    def fault_save_spec(self, wildcards) -> str:
        cell = grid.fault_cell(self.config, wildcards.fault_id)
        return json.dumps(grid.fault_save_spec(self.config, cell).to_dict())

    def fault_load_spec(self, wildcards) -> str:
        cell = grid.fault_cell(self.config, wildcards.fault_id)
        return json.dumps(grid.fault_load_spec(self.config, cell).to_dict())

    def fault_load_inputs(self, wildcards) -> list[str]:
        cell = grid.fault_cell(self.config, wildcards.fault_id)
        return [
            grid.save_record_path(cell.save_model, cell.save, cell.root),
            grid.save_dir(cell.save_model, cell.save, cell.root),
        ]

    def fault_load_ranks(self, wildcards) -> int:
        """World size of a fault cell's load job: its load layout (the rule has no {layout})."""
        return self.layouts[grid.fault_cell(self.config, wildcards.fault_id).load].world_size

    def fault_record_paths(self) -> list[str]:
        """The load record of every fault cell (rule selftest_table)."""
        return [cell.load_record_path for cell in grid.fault_cells(self.config)]

    @property
    def fault_save_resources(self) -> dict[str, Callable]:
        return self._resources(self.job_ranks, lambda wildcards: SAVE_STEPS)

    @property
    def fault_load_resources(self) -> dict[str, Callable]:
        return self._resources(self.fault_load_ranks, lambda wildcards: SAVE_STEPS)

    # --- Slurm resources (profiles/slurm; the local executor ignores them) ------------------
    # A job of world size W runs on ceil(W / run.gpus_per_node) nodes, the same number of
    # ranks (and GPUs) on each; run.gpus_per_node = 0 (CPU jobs) keeps every rank on one node.
    # Values of None leave a resource unset.
    def _resources(
        self, ranks: Callable[..., int], steps: Callable[..., int]
    ) -> dict[str, Callable]:
        """A rule's ``resources:`` (``**plan.<rule's>_resources``), from its job's world size
        and its number of progress marks, each a function of the wildcards. Snakemake passes
        a resource function the arguments its parameters name (wildcards, attempt)."""

        def placement(wildcards) -> tuple[int, int, int]:
            return self.placement(ranks(wildcards))

        return {
            "ranks": ranks,
            "nodes": lambda wildcards: placement(wildcards)[0],
            "tasks": lambda wildcards: slurm_tasks(*placement(wildcards)),
            "mpi": lambda wildcards: slurm_mpi(*placement(wildcards)),
            "gres": lambda wildcards: slurm_gres(*placement(wildcards)),
            "tasks_per_gpu": lambda wildcards: slurm_tasks_per_gpu(*placement(wildcards)),
            "cpus_per_task": lambda wildcards: slurm_cpus_per_task(*placement(wildcards)),
            "mem_mb": lambda wildcards: slurm_mem_mb(*placement(wildcards)),
            "runtime": lambda wildcards, attempt: self.runtime(steps(wildcards), attempt),
        }

    def placement(self, world: int) -> tuple[int, int, int]:
        """(nodes, ranks per node, GPUs per node) of a job of ``world`` ranks."""
        gpus_per_node = self.config["run"]["gpus_per_node"]
        if not gpus_per_node:
            return 1, world, 0
        nodes = -(-world // gpus_per_node)
        return nodes, world // nodes, world // nodes

    def runtime(self, steps: int, attempt: int) -> int:
        """Minutes: twice the watchdog's worst case (start-up taking ``run.startup_timeout_s``;
        training, the save and every checkpoint a load job verifies, each taking
        ``run.cell_timeout_s``), plus 10; more on each retry. ``steps``: the job's progress
        marks."""
        run = self.config["run"]
        worst_s = run["startup_timeout_s"] + (steps + 2) * run["cell_timeout_s"]
        return (10 + -(-2 * int(worst_s) // 60)) * attempt


# Each of (nodes, ranks per node, GPUs per node) -> one Slurm resource.
def slurm_tasks(nodes: int, per_node: int, gpus: int) -> int | None:
    """One task per node (a torchrun agent each) for a multi-node job."""
    return nodes if nodes > 1 else None


def slurm_mpi(nodes: int, per_node: int, gpus: int) -> str | None:
    """Multi-node jobs: the plugin runs the command in the batch script unwrapped and the
    launcher calls srun itself (pipeline_lib.job.launcher)."""
    return "srun" if nodes > 1 else None


def slurm_gres(nodes: int, per_node: int, gpus: int) -> str | None:
    """``--gres=gpu:N``: N GPUs on every node of the job, one per rank."""
    return f"gpu:{gpus}" if gpus else None


def slurm_tasks_per_gpu(nodes: int, per_node: int, gpus: int) -> int | None:
    """0 for GPU jobs: no ``--ntasks-per-gpu`` (which would start the command per GPU)."""
    return 0 if gpus else None


def slurm_cpus_per_task(nodes: int, per_node: int, gpus: int) -> int | None:
    """Multi-node jobs: one CPU per rank of a node (one-node jobs: ``threads``)."""
    return per_node if nodes > 1 else None


def slurm_mem_mb(nodes: int, per_node: int, gpus: int) -> int:
    """Memory per node: 1 GB for the agent and the job's own checks, 2 GB per rank."""
    return 1000 + 2000 * per_node
