"""The command line: argument parsing only, one handler per subcommand (set_defaults(func=...))."""

from __future__ import annotations

import argparse

import pytest

from pipeline_lib import cli


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_subcommand_names_its_handler():
    commands = subcommands()
    assert {"save", "load", "aggregate", "report", "selftest", "make-env", "check-config",
            "gate", "findings-table", "reproducers"} <= set(commands)  # fmt: skip
    for name, parser in commands.items():
        assert callable(parser.get_default("func")), name


def test_a_grid_job_needs_its_version_root_and_layout(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["save", "--grid", "{}", "--layout", "single"])
    assert exit_.value.code == 2
    assert "--grid needs --version-root and --layout" in capsys.readouterr().err


def test_report_keeps_its_command_option_apart_from_the_subcommand():
    files = ["--matrix", "m", "--tensors", "t", "--configfile", "c", "--html", "h"]
    argv = ["report", *files, "--markdown", "s", "--command", "snakemake -n"]
    args = cli.build_parser().parse_args(argv)
    assert args.command == "report" and args.command_line == "snakemake -n"


def test_a_jobs_clock_accounts_for_its_time_in_parts_that_add_up(capsys, monkeypatch):
    """The last line of a job's log (bench/benchmark.py sums it over a matrix): prepare until
    the first launch, the launches, the rest writing records."""
    import re
    import time

    from pipeline_lib.job import driver

    clock = driver.JobClock()
    clock.started -= 1.0  # one second of imports and spec before this point
    with clock.launch():
        time.sleep(0.2)
    with clock.launch():
        time.sleep(0.1)
    clock.report()
    line = capsys.readouterr().out.strip()
    found = re.fullmatch(
        r"dcp-matrix: job time ([\d.]+) s: prepare ([\d.]+) s, ranks ([\d.]+) s "
        r"\(2 launch\(es\)\), records ([\d.]+) s",
        line,
    )
    assert found, line
    total, prepare, ranks, records = map(float, found.groups())
    # Lower bounds from the sleeps; upper bounds that only a part counted in the wrong place
    # (the second of prepare) exceeds, not a loaded machine's late wake-ups.
    assert prepare >= 1.0 and 0.3 <= ranks < 1.0 and records < 1.0
    assert abs(prepare + ranks + records - total) <= 0.025  # four values rounded to 0.01


USER_MODEL = """
import torch


def build():
    {body}


def make_inputs(batch_size, generator):
    return torch.randn(batch_size, 4, generator=generator)
"""


def _user_model(tmp_path, monkeypatch, name: str, body: str) -> str:
    """An import-path model ``<name>:build`` whose build() runs ``body``, importable from here."""
    (tmp_path / f"{name}.py").write_text(USER_MODEL.format(body=body))
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{name}:build"


def test_check_config_names_a_model_whose_build_raises(tmp_path, monkeypatch, capsys):
    """The disk estimate builds the model: a build() that raises is one line naming the model
    and the exception, exit 1, nothing on stdout (no traceback); a Snakemake run goes on
    without the estimate and a job's room check leaves the item out."""
    import yaml

    from pipeline_lib.plan import config, disk_estimate, grid
    from pipeline_lib.plan.snakemake_view import Plan

    model = _user_model(
        tmp_path, monkeypatch, "raising_build", 'raise RuntimeError("no weights\\nmore")'
    )
    raw = {"models": [model], "layouts": {"single": {"framework": "single", "mesh": [1]}}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["check-config", str(path)])
    out, err = capsys.readouterr()
    assert exit_.value.code == 1 and out == ""
    assert err.splitlines() == [
        f"{path}: models.0: model 'raising_build:build': build() raised RuntimeError: no weights"
    ], err
    assert Plan(raw, str(tmp_path)).disk_line() == (
        "dcp-matrix: no disk estimate: model 'raising_build:build': build() raised "
        "RuntimeError: no weights"
    )
    spec = grid.save_job_spec(config.validate(raw), grid.RESULTS, "single")
    assert disk_estimate.job_bytes(spec, unbuildable_ok=True).total == disk_estimate.PER_JOB
    assert disk_estimate.room_error(spec, tmp_path) is None


def test_a_model_that_cannot_be_built_on_meta_is_counted_on_the_cpu(tmp_path, monkeypatch):
    from pipeline_lib.plan import disk_estimate

    body = "return torch.nn.Linear(3, int(torch.ones(1).sum().item()) + 1)  # .item(): not on meta"
    model = _user_model(tmp_path, monkeypatch, "cpu_only_build", body)
    assert disk_estimate.model_state(model) == (3 * 2 + 2, 2, 0, 0)
