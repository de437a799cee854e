"""One command per job: ``python -m pipeline_lib {save,load,aggregate,report,check-config,...}``.

Argument parsing only: every subcommand names its handler with ``set_defaults(func=...)``, which
takes the parsed arguments and returns None, or an exit status. The save and load jobs themselves
are pipeline_lib.job.driver; they always write their records and exit 0 when the job itself failed:
a failing cell never stops the matrix.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _reuses(args: argparse.Namespace, config: dict | None) -> bool:
    """Whether a job may reuse what a run before it computed (pipeline_lib.job.reuse): not with
    --no-reuse (a rule Snakemake forces) nor with the config key ``reuse: false``."""
    return not args.no_reuse and (config is None or config.get("reuse", True))


def _cmd_job(args: argparse.Namespace) -> None:
    """A save or load job: its spec as given (--spec), or expanded from the grid (--grid)."""
    from pipeline_lib.job import launcher

    launcher.start_rank_server()  # its imports run while this process prepares the job
    from pipeline_lib.job import driver
    from pipeline_lib.plan import grid
    from pipeline_lib.plan.specs import JobSpec

    config = None
    if args.spec:
        spec = JobSpec.from_dict(json.loads(args.spec))
    elif not (args.version_root and args.layout):
        args.usage_error("--grid needs --version-root and --layout")
    else:
        expand = grid.save_job_spec if args.command == "save" else grid.load_job_spec
        config = json.loads(args.grid)
        spec = expand(config, args.version_root, args.layout)
    run = driver.run_save_job if args.command == "save" else driver.run_load_job
    run(spec, reuse_units=_reuses(args, config))


def _cmd_import(args: argparse.Namespace) -> None:
    """The import job of an existing checkpoint (--grid, --name): always writes its record (exit
    0), the import itself run in a child process under a watchdog (pipeline_lib.job.import_job);
    that child (--spec, --progress) imports."""
    if args.spec:
        from pipeline_lib.job.existing import import_checkpoint
        from pipeline_lib.job.import_job import Marks
        from pipeline_lib.plan.specs import ExistingSpec

        import_checkpoint(
            ExistingSpec.from_dict(json.loads(args.spec)),
            Marks(args.progress),
            reuse_units=not args.no_reuse,
        )
        return
    if not args.name:
        args.usage_error("--grid needs --name")
    from pipeline_lib.job import import_job
    from pipeline_lib.plan import grid

    config = json.loads(args.grid)
    limits = config["run"]["cell_timeout_s"], config["run"]["startup_timeout_s"]
    spec = grid.existing_spec(config, args.name)
    import_job.run(spec, *limits, reuse_units=_reuses(args, config))


def _cmd_aggregate(args: argparse.Namespace) -> None:
    from pipeline_lib.results.aggregate import aggregate

    aggregate(args.records, args.matrix, args.tensors, git_commit=args.git_commit)


def _cmd_report(args: argparse.Namespace) -> None:
    from pipeline_lib.plan.config import load, validate
    from pipeline_lib.results.report import write_report

    config = load(args.configfile) if args.configfile else validate(json.loads(args.config_json))
    write_report(
        args.matrix, args.tensors, config, args.html, args.markdown, args.snakemake_version,
        baseline=args.baseline or config.get("baseline"), command=args.command_line,
    )  # fmt: skip


def _cmd_selftest(args: argparse.Namespace) -> int | None:
    from pipeline_lib.results.selftest import check, summarize

    if args.check:
        return check(args.check, args.ok)
    summarize(args.records, args.table, args.markdown)
    return None


def _cmd_reproducers(args: argparse.Namespace) -> int:
    """A reproducer per non-pass cell; an unreadable config or matrix: one line, exit 1 (a
    cell that fails is written down in its folder and the others go on: exit 0)."""
    from pipeline_lib.plan.config import ConfigError, load, validate
    from pipeline_lib.plan.matrix_file import MatrixFileError, read_matrix
    from pipeline_lib.results.reproducer import write_all

    try:
        config = (
            load(args.configfile) if args.configfile else validate(json.loads(args.config_json))
        )
        matrix = read_matrix(args.matrix)
    except (ConfigError, MatrixFileError, OSError, ValueError) as exc:
        print(f"reproducers: {' '.join(str(exc).split())[:300]}", file=sys.stderr)
        return 1
    written = write_all(matrix, config, args.out)
    print(f"{len(written)} reproducer(s) under {args.out}")
    return 0


def _cmd_gate(args: argparse.Namespace) -> int:
    from pipeline_lib.results.baseline import gate

    return gate(args.matrix, args.baseline, args.fail_on_new, args.ok, args.comparison)


def _cmd_findings_table(args: argparse.Namespace) -> int:
    from pipeline_lib.results import findings_table

    return findings_table.write(args.expectations, args.write, args.check)


def _cmd_axes_table(args: argparse.Namespace) -> int:
    from pipeline_lib.common import doc_tables
    from pipeline_lib.plan.axes import docs_table

    return doc_tables.write("axes-table", args.write, docs_table(), args.check)


def _cmd_make_env(args: argparse.Namespace) -> None:
    from pipeline_lib.plan.config import env_dir_error
    from pipeline_lib.plan.torch_envs import make_env

    if error := env_dir_error(args.prefix):
        sys.exit(f"make-env: --prefix: {error}")
    make_env(Path(args.prefix), args.requirement)


def _cmd_check_config(args: argparse.Namespace) -> int | None:
    """Valid: one line of counts and one of the disk estimate. Invalid, or a model that cannot
    be built (the estimate builds it): one line per error on stderr (no traceback), exit
    status 1."""
    from pipeline_lib.plan import config as config_module
    from pipeline_lib.plan import grid
    from pipeline_lib.plan.disk_estimate import ModelBuildError, grid_bytes

    try:
        config = config_module.load(args.configfile)
        estimate = grid_bytes(config)
    except config_module.ConfigError as exc:
        for line in config_module.error_lines(exc):
            print(line, file=sys.stderr)
        return 1
    except ModelBuildError as exc:
        print(f"{args.configfile}: {_model_field(config, exc.model)}: {exc}", file=sys.stderr)
        return 1
    saves, loads = len(grid.save_layouts(config)), len(grid.load_layouts(config))
    print(
        f"{args.configfile}: valid; {len(grid.cells(config))} cells, "
        f"{len(config['models'])} model(s) x {saves} save layout(s) x {loads} load layout(s)"
    )
    if config["checkpoints"]:
        print(
            f"{args.configfile}: and {grid.existing_cell_count(config)} cells of "
            f"{len(config['checkpoints'])} existing checkpoint(s) x {loads} load layout(s)"
        )
    print(f"{args.configfile}: the grid writes {estimate}")
    return None


def _model_field(config: dict, model: str) -> str:
    """The config field that names ``model``: ``models.<i>``, else ``models`` (a model the
    fault campaign's cells save)."""
    return f"models.{config['models'].index(model)}" if model in config["models"] else "models"


def _add_job_commands(sub) -> None:
    for name in ("save", "load"):
        p = sub.add_parser(name, help=f"run one {name} job")
        given = p.add_mutually_exclusive_group(required=True)
        given.add_argument("--spec", help="the job spec as JSON (pipeline_lib.plan.grid.job_spec)")
        # A grid's job spec can exceed the 128 KiB a command-line argument may hold.
        given.add_argument(
            "--grid", help="the validated config as JSON: the job of --version-root, --layout"
        )
        p.add_argument(
            "--version-root", "--root", help="with --grid: the job's version root (results, ...)"
        )
        p.add_argument("--layout", help="with --grid: the job's layout")
        _add_no_reuse(p)
        p.set_defaults(func=_cmd_job, usage_error=p.error)
    p = sub.add_parser("import-checkpoint", help="read an existing checkpoint (its reference)")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--grid", help="the validated config as JSON: the import of --name")
    given.add_argument("--spec", help="the import's spec as JSON: import here (the job's child)")
    p.add_argument("--name", help="with --grid: the checkpoint's name (config checkpoints)")
    p.add_argument("--progress", help="with --spec: the progress file the job's watchdog reads")
    _add_no_reuse(p)
    p.set_defaults(func=_cmd_import, usage_error=p.error)


def _add_no_reuse(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-reuse", action="store_true",
        help="run every unit, reuse nothing a run before computed (its rule is forced)",
    )  # fmt: skip


def _add_result_commands(sub) -> None:
    p = sub.add_parser("aggregate", help="job records -> matrix.parquet and tensors.parquet")
    p.add_argument("--matrix", required=True)
    p.add_argument("--tensors", required=True)
    p.add_argument("--git-commit", default="unknown")
    p.add_argument("records", nargs="+")
    p.set_defaults(func=_cmd_aggregate)
    p = sub.add_parser(
        "report", help="matrix.parquet + tensors.parquet -> report.html and summary.md"
    )
    p.add_argument("--matrix", required=True, help="results/matrix.parquet")
    p.add_argument("--tensors", required=True, help="results/tensors.parquet")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--configfile", help="the grid config (YAML) the results were made with")
    source.add_argument("--config-json", help="the same, as JSON (the Snakemake rule's config)")
    p.add_argument("--snakemake-version", help="the Snakemake running the workflow")
    p.add_argument("--html", required=True, help="report.html to write")
    p.add_argument("--markdown", required=True, help="summary.md to write")
    p.add_argument("--baseline", help="expectations file or matrix.parquet to compare with")
    p.add_argument(
        "--command", dest="command_line", help="the command that made the results (shown)"
    )
    p.set_defaults(func=_cmd_report)
    p = sub.add_parser("selftest", help="fault-campaign records -> selftest.parquet / .md")
    p.add_argument("--table", help="selftest.parquet to write")
    p.add_argument("--markdown", help="selftest.md to write")
    p.add_argument("--check", help="selftest.parquet to check: exit 1 if a fault was missed")
    p.add_argument("--ok", help="with --check: marker file written when every fault was caught")
    p.add_argument("records", nargs="*")
    p.set_defaults(func=_cmd_selftest)
    p = sub.add_parser("reproducers", help="a standalone reproducer per non-pass cell")
    p.add_argument("--matrix", default="results/matrix.parquet")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--configfile")
    given.add_argument("--config-json")
    p.add_argument("--out", default="results/reproducers")
    p.set_defaults(func=_cmd_reproducers)


def _add_gate_commands(sub) -> None:
    p = sub.add_parser(
        "gate",
        help="compare a matrix with a baseline: exit 1 on a regression or change, or when it "
        "judged no cell; 2 when the matrix or the baseline cannot be read",
    )
    p.add_argument("--matrix", default="results/matrix.parquet")
    p.add_argument(
        "--baseline", required=True, help="an expectations file (.yaml) or a matrix.parquet"
    )
    p.add_argument("--fail-on-new", action="store_true", help="also fail on new non-pass cells")
    p.add_argument("--comparison", help="comparison.parquet to write (every cell, its class)")
    p.add_argument("--ok", help="marker file written when the gate passes")
    p.set_defaults(func=_cmd_gate)
    p = sub.add_parser(
        "findings-table", help="the findings table of docs/findings.md from expectations"
    )
    p.add_argument("expectations", nargs="*", help="default: expectations/torch-*.yaml")
    _add_table_page(p, "docs/findings.md")
    p.set_defaults(func=_cmd_findings_table)
    p = sub.add_parser("axes-table", help="the axes table of docs/config.md from the axes")
    _add_table_page(p, "docs/config.md")
    p.set_defaults(func=_cmd_axes_table)


def _add_table_page(parser: argparse.ArgumentParser, page: str) -> None:
    parser.add_argument("--write", help=f"{page}: replace the table between its markers")
    parser.add_argument("--check", action="store_true", help="with --write: exit 1 if it differs")


def _add_setup_commands(sub) -> None:
    p = sub.add_parser("make-env", help="build a torch_versions environment (venv + project)")
    p.add_argument("--requirement", required=True, help='pip requirement, e.g. "torch==2.14.1"')
    p.add_argument("--prefix", required=True, help="the environment's folder")
    p.set_defaults(func=_cmd_make_env)
    p = sub.add_parser("check-config", help="validate a config file and count its cells")
    p.add_argument("configfile")
    p.set_defaults(func=_cmd_check_config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline_lib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_job_commands(sub)
    _add_result_commands(sub)
    _add_setup_commands(sub)
    _add_gate_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    status = args.func(args)
    if status is not None:
        sys.exit(status)
