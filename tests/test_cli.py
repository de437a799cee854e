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

    from pipeline_lib import driver

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
    assert prepare >= 1.0 and 0.3 <= ranks < 0.6 and records < 0.2
    assert abs(prepare + ranks + records - total) < 0.02
