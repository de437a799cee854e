"""dcp-matrix: save a DCP checkpoint under every layout, load it under every other, verify.

config.yaml -> grid (pipeline_lib.plan.grid) -> save / load jobs -> records -> Parquet.
"""

import sys

from snakemake.utils import min_version

min_version("9.0")

# The rules call pipeline_lib from this checkout with this interpreter.
sys.path.insert(0, workflow.basedir)

from pipeline_lib.plan.snakemake_view import Plan

# The default grid, unless --configfile names another (Snakemake would merge the two).
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


report: "workflow/report/workflow.rst"


# dag_settings: a rule forced by -R/-F/-f re-verifies (its jobs reuse nothing).
plan = Plan(
    config,
    workflow.basedir,
    announce=workflow.is_main_process,
    dag_settings=lambda: workflow.dag_settings,
)


# Before the first job starts: what this run forces, also for a cluster job's own Snakemake
# (snakemake_plan.Forced; a job's params read it too, but not every job's are read before).
onstart:
    plan.forced


# The rules read the validated config, every default filled in (Plan leaves Snakemake's as is).
config = plan.config
PYTHON = sys.executable


wildcard_constraints:
    model=plan.model_pattern,
    layout=plan.wildcard_pattern("layouts"),
    version=plan.wildcard_pattern("torch_versions") or "(?!)",


include: "workflow/rules/matrix.smk"
# gate.smk first: report.smk uses its SNAKEMAKE_COMMAND.
include: "workflow/rules/gate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        plan.targets(),
        # The report needs a matrix: a faults-only config (no models) has none.
        ["results/report.html", "results/summary.md"] if config["models"] else [],
        GATE_TARGETS,
