"""Issue 18: reason signatures, comparison classes, the gate, the shipped expectations."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline_lib import baseline as b
from pipeline_lib.cli import main as cli_main
from tests import procs
from tests.conftest import REPO

BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    ("one", "other"),
    [
        # ranks, counts, diffs: the same failure
        (
            "save: CheckpointException on rank(s) [0]: RuntimeError: Some tensors share memory:"
            " [{'model.output.weight', 'model.embedding.weight'}]. (during save)",
            "save: CheckpointException on rank(s) [0, 1, 2, 3]: RuntimeError: Some tensors share"
            " memory: [{'model.embedding.weight', 'model.output.weight'}]. (during save)",
        ),
        (
            "files vs saver: 10 of 40 entries differ; first optim.state.blocks.0.fc1.bias.step:"
            " bytes differ (max_abs_diff 2)",
            "files vs saver: 5 of 22 entries differ; first optim.state.blocks.0.fc1.bias.step:"
            " bytes differ (max_abs_diff 1.5e-09)",
        ),
        (
            "load: rank 0 killed by SIGSEGV during cell a",
            "load: rank 3 killed by SIGSEGV during cell b",
        ),
        (
            "resume: loss differs by nan (relative) at resume step 1, above resume_rtol 1e-05",
            "resume: loss differs by 2.38e+34 (relative) at resume step 0, above resume_rtol 1e-05",
        ),
        # paths, addresses, hex, releases
        (
            "files vs saver: cannot read checkpoint /tmp/a/results/save/mlp/ddp_2/checkpoint: X",
            "files vs saver: cannot read checkpoint results/axes/x/save/mlp/ddp_2/checkpoint: X",
        ),
        (
            "RuntimeError: Connection closed by peer [127.0.0.1]:41386 at 0x7f3a2b",
            "RuntimeError: Connection closed by peer [10.1.2.3]:29500 at 0xdeadbeef",
        ),
        ("torch 2.13.0+cpu cannot", "torch 2.15.0 cannot"),
    ],
)
def test_signature_ignores_what_varies(one, other):
    assert b.signature(one) == b.signature(other)


@pytest.mark.parametrize(
    ("one", "other"),
    [
        # the entry, the exception type, the check, the status words name the failure
        (
            "first model.blocks.0.fc1.bias: bytes differ",
            "first model.blocks.1.fc1.bias: bytes differ",
        ),
        ("load: RuntimeError: x", "load: ValueError: x"),
        ("load: rank 0 killed by SIGSEGV", "load: rank 0 killed by SIGKILL"),
        ("files vs saver: 1 of 2 entries differ", "loader vs saver: 1 of 2 entries differ"),
        (
            "save layout: TP degree 2 does not divide mlp_uneven",
            "save layout: TP degree 2 does not divide mlp",
        ),
    ],
)
def test_signature_keeps_what_names_the_failure(one, other):
    assert b.signature(one) != b.signature(other)


def test_signature_text():
    reason = (
        "load: CheckpointException on rank(s) [0, 1]: RuntimeError: Missing key in checkpoint"
        " state_dict: optim.state.output.weight.step. (during cell fsdp2_4)"
    )
    assert b.signature(reason) == (
        "load: CheckpointException on rank(s) N: RuntimeError: Missing key in checkpoint"
        " state_dict: optim.state.output.weight.step. (during cell"
    ) or "fsdp2_4" not in b.signature(reason)
    assert b.signature("save layout: TP degree 2 does not divide mlp_uneven hidden=25") == (
        "save layout: TP degree N does not divide mlp_uneven hidden=N"
    )
    assert b.signature("x under fsdp1_hybrid_2x2") == "x under fsdp1_hybrid_2x2"
    assert b.signature(None) == b.signature("") == ""
    assert b.signature_matches("a [N] *.step: b", "a [N] optim.x.step: b")
    assert not b.signature_matches("a [N]", "a N")


@pytest.mark.parametrize(
    ("status", "sig", "base_status", "base_sig", "expected"),
    [
        ("pass", "", "pass", "", "same"),
        ("fail", "x", "fail", "x", "same"),
        ("crash", "x", "pass", "", "regression"),
        ("skip", "x", "pass", "", "regression"),
        ("pass", "", "crash", "x", "fixed"),
        ("pass", "", "skip", "x", "fixed"),
        ("fail", "x", "crash", "x", "changed"),
        ("fail", "y", "fail", "x", "changed"),
        ("fail", "x", None, None, "new"),
        ("pass", "", None, None, "new"),
    ],
)
def test_classify(status, sig, base_status, base_sig, expected):
    assert b.classify(status, sig, base_status, base_sig) == expected


def cell(model="mlp", save="ddp_2", load="single", status="pass", reason="", version="2.13.0",
         **axes) -> dict:  # fmt: skip
    row = {"model": model, "save_layout": save, "load_layout": load, "save_framework": save[:-2],
           "load_framework": load, "save_world_size": 2, "load_world_size": 1,
           "mode": "sharded", "load_mode": "same", "format": "dcp", "async_save": "sync", "optimizer": "adam",
           "param_dtype": "float32", "load_init": "device", "status": status, "reason": reason,
           "save_torch_version": version, "load_torch_version": version}  # fmt: skip
    row.update(axes)
    return row


def test_compare_with_a_matrix_cells_that_appear_and_disappear():
    crash = "save: rank 0 killed by SIGSEGV during reference"
    old = pd.DataFrame([
        cell("mlp", status="pass"),
        cell("mlp", load="ddp_2", status="fail", reason="resume: loss differs by 1 (relative)"),
        cell("mlp", load="fsdp1_2", status="crash", reason=crash),
        cell("mlp", load="fsdp2_4", status="error", reason="load: ValueError: a"),
        cell("tied_embedding", status="pass"),  # gone from the new run
    ])  # fmt: skip
    new = pd.DataFrame([
        cell("mlp", status="crash", reason=crash, version="2.15.0"),
        cell("mlp", load="ddp_2", status="fail", reason="resume: loss differs by 3 (relative)",
             version="2.15.0"),
        cell("mlp", load="fsdp1_2", status="pass", version="2.15.0"),
        cell("mlp", load="fsdp2_4", status="error", reason="load: KeyError: a", version="2.15.0"),
        cell("transformer", status="fail", reason="x", version="2.15.0"),  # not in the baseline
    ])  # fmt: skip
    comparison = b.compare(new, old)
    assert list(comparison.cells.comparison) == ["regression", "same", "fixed", "changed", "new"]
    assert list(comparison.missing.model) == ["tied_embedding"]
    code, lines = b.gate_lines(comparison)
    assert code == 1
    assert lines[0] == ("REGRESSION: mlp ddp_2 -> single (torch 2.15.0): pass -> crash: " + crash)
    assert lines[1].startswith(
        "CHANGED: mlp ddp_2 -> fsdp2_4 (torch 2.15.0): error -> error: load: KeyError"
    )
    assert lines[2].startswith("FIXED: mlp ddp_2 -> fsdp1_2")
    assert lines[3] == "MISSING: 1 baseline cell(s) are not in this run"
    assert lines[-1].startswith("gate FAILED against matrix 5 cells (torch 2.13.0): 1 regression")
    # a new cell that does not pass fails the gate only when asked
    assert len(comparison.failing(fail_on_new=True)) == 3


EXPECTATIONS = {
    "torch": "2.13.0",
    "covers": {"model": ["mlp", "tied_embedding"]},
    "findings": [
        {"id": "full-crash", "cells": {"mode": "full", "save_framework": ["fsdp1*"]},
         "status": "crash", "signature": "save: rank N killed by SIGSEGV*", "note": "a link"},
        {"id": "unused", "cells": {"model": "mlp", "format": "torch_save"}, "status": "skip"},
    ],
}  # fmt: skip


def test_compare_with_expectations(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(EXPECTATIONS))
    exp = b.load_expectations(path)
    crash = "save: rank 1 killed by SIGSEGV during reference"
    run = pd.DataFrame([
        cell("mlp", save="fsdp1_2", status="crash", reason=crash, mode="full"),  # known
        cell("mlp", save="fsdp1_2", status="pass", load="ddp_2", mode="full"),  # fixed
        cell("mlp", save="ddp_2", status="crash", reason=crash, mode="full"),  # regression
        cell("mlp", save="fsdp1_2", status="timeout", reason="t", mode="full"),  # changed
        cell("mlp_frozen", status="fail", reason="x"),  # new: not covered
        cell("tied_embedding", status="pass"),  # same: covered, expected pass
    ])  # fmt: skip
    comparison = b.compare(run, exp)
    assert list(comparison.cells.comparison) == [
        "same", "fixed", "regression", "changed", "new", "same"
    ]  # fmt: skip
    assert comparison.cells.baseline_finding.iloc[0] == "full-crash"
    assert [f.id for f in comparison.unused] == ["unused"]
    code, lines = b.gate_lines(comparison)
    assert code == 1 and len(comparison.failing()) == 2
    assert lines[0].startswith(
        "REGRESSION: mlp ddp_2 -> single [mode=full] (torch 2.13.0): pass -> crash"
    )
    assert lines[2].startswith(
        "FIXED: mlp fsdp1_2 -> ddp_2 [mode=full] (torch 2.13.0): crash -> pass"
    )
    assert "UNUSED: finding unused" in lines[3]
    # only the known finding: the gate passes
    code, _ = b.gate_lines(b.compare(run.iloc[[0, 1, 5]], exp))
    assert code == 0


def test_expectations_refuse_unknown_columns(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"torch": "x", "findings": [
        {"id": "a", "cells": {"modle": "mlp"}, "status": "fail"}]}))  # fmt: skip
    with pytest.raises(ValueError, match="modle: not a cell column"):
        b.load_expectations(path)


def test_shipped_expectations_load():
    paths = b.DEFAULT_EXPECTATIONS
    assert {Path(p).name for p in paths} >= {
        "torch-2.13.0.yaml",
        "torch-2.14.1.yaml",
        "torch-2.15.0.yaml",
    }
    for path in paths:
        exp = b.load_expectations(path)
        assert exp.findings and exp.torch


def test_findings_table_is_generated_from_the_expectations():
    proc = procs.run(
        [sys.executable, "-m", "pipeline_lib", "findings-table", "--write", "docs/findings.md",
         "--check"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, (
        proc.stdout
        + proc.stderr
        + (" (regenerate: python -m pipeline_lib findings-table --write docs/findings.md)")
    )


@pytest.mark.e2e
def test_gate_end_to_end(tmp_path):
    """A real run with a known finding (format=safetensors: tied_embedding refuses shared
    tensors) passes the gate; the same run against a baseline in which one of those cells
    passed fails it, naming that cell; a reproducer is written for each non-pass cell."""
    cfg = {
        "models": ["tied_embedding"],
        "layouts": {
            "single": {"framework": "single", "mesh": [1]},
            "ddp_2": {"framework": "ddp", "mesh": [2]},
        },
        "formats": ["dcp", "safetensors"],
        "combine_axes": "one_at_a_time",
        "run": {"cell_timeout_s": 120},
        "baseline": str(REPO / "expectations" / "torch-2.13.0.yaml"),
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = procs.run(
        [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "--cores",
         "2", "--configfile", str(tmp_path / "config.yaml")],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = tmp_path / "results"
    assert "gate passed" in (results / "gate.ok").read_text()
    comparison = pd.read_parquet(results / "comparison.parquet")
    assert set(comparison.comparison) == {"same"}
    assert (comparison.baseline_finding == "safetensors-shared-tensors").sum() == 4
    summary = (results / "summary.md").read_text()
    assert "## Comparison with the baseline" in summary
    repros = sorted(p.name for p in (results / "reproducers").iterdir() if p.is_dir())
    assert len(repros) == 4 and all(r.startswith("format-safetensors.") for r in repros)

    # one cell broken: the baseline says it passed
    matrix = pd.read_parquet(results / "matrix.parquet")
    old = matrix.copy()
    broken = (
        (old.format == "safetensors") & (old.save_layout == "ddp_2") & (old.load_layout == "single")
    )
    old.loc[broken, ["status", "reason"]] = ["pass", ""]
    old.to_parquet(tmp_path / "old.parquet")
    with pytest.raises(SystemExit) as exit_:
        cli_main(["gate", "--matrix", str(results / "matrix.parquet"), "--baseline",
                  str(tmp_path / "old.parquet")])  # fmt: skip
    assert exit_.value.code == 1
