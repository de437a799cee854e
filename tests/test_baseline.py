"""The regression gate: reason signatures, comparison classes, the gate, the shipped
expectations."""

from __future__ import annotations

import math
import re
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline_lib.cli import main as cli_main
from pipeline_lib.plan import config, grid
from pipeline_lib.plan.expectations import ExpectationsError, load_expectations
from pipeline_lib.plan.matrix_file import MatrixFileError, read_matrix
from pipeline_lib.plan.snakemake_view import Plan
from pipeline_lib.results import baseline as b
from pipeline_lib.results.findings_table import DEFAULT_EXPECTATIONS
from pipeline_lib.verify import records
from pipeline_lib.verify.results import LoadResult, SaveResult
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


MESHES = {"single": "1", "ddp_2": "2", "fsdp1_2": "2", "fsdp2_2": "2", "fsdp2_4": "4"}


def cell(model="mlp", save="ddp_2", load="single", status="pass", reason="", version="2.13.0",
         **axes) -> dict:  # fmt: skip
    row = {"model": model, "save_layout": save, "load_layout": load,
           "save_framework": save.split("_")[0], "load_framework": load.split("_")[0],
           "save_mesh": MESHES[save], "load_mesh": MESHES[load],
           "save_world_size": int(MESHES[save]), "load_world_size": int(MESHES[load]),
           "save_pp_schedule": None, "save_microbatches": None,
           "load_pp_schedule": None, "load_microbatches": None,
           "mode": "sharded", "load_mode": "same", "format": "dcp", "async_save": "sync", "optimizer": "adam",
           "param_dtype": "float32", "load_init": "device", "load_process": "fresh", "save_sequence": "once",
           "status": status, "reason": reason,
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


LAYOUTS = {name: {"framework": name.split("_")[0], "mesh": [int(mesh)]}
           for name, mesh in MESHES.items()}  # fmt: skip
GRID = {"run": "a test grid", "models": ["mlp", "tied_embedding"], "layouts": LAYOUTS,
        "mode": ["sharded", "full"], "combine_axes": "product"}  # fmt: skip
EXPECTATIONS = {
    "torch": "2.13.0",
    "measured": [GRID],
    "findings": [
        {"id": "full-crash", "cells": {"mode": "full", "save_framework": ["fsdp1*"]},
         "status": "crash", "signature": "save: rank N killed by SIGSEGV*", "note": "a link"},
        {"id": "unused", "cells": {"model": "mlp", "format": "torch_save"}, "status": "skip"},
    ],
}  # fmt: skip


def write(tmp_path, data, name="exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_compare_with_expectations(tmp_path):
    exp = b.load_expectations(write(tmp_path, EXPECTATIONS))
    crash = "save: rank 1 killed by SIGSEGV during reference"
    run = pd.DataFrame([
        cell("mlp", save="fsdp1_2", status="crash", reason=crash, mode="full"),  # known
        cell("mlp", save="fsdp1_2", status="pass", load="ddp_2", mode="full"),  # fixed
        cell("mlp", save="ddp_2", status="crash", reason=crash, mode="full"),  # regression
        cell("mlp", save="fsdp1_2", status="timeout", reason="t", mode="full"),  # changed
        cell("mlp_frozen", status="fail", reason="x"),  # new: no grid has the model
        cell("tied_embedding", status="pass"),  # same: measured, expected pass
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
    path = write(tmp_path, {"torch": "x", "measured": [GRID], "findings": [
        {"id": "a", "cells": {"modle": "mlp"}, "status": "fail"}]})  # fmt: skip
    with pytest.raises(ValueError, match="modle: not a cell column"):
        b.load_expectations(path)


def test_shipped_expectations_load():
    paths = DEFAULT_EXPECTATIONS
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
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, (
        proc.stdout
        + proc.stderr
        + (" (regenerate: python -m pipeline_lib findings-table --write docs/findings.md)")
    )


# --- signatures match in linear time ------------------------------------------------------------
def _regex_matches(pattern: str, sig: str) -> bool:
    """The matcher signature_matches replaced (a regex of ``.*``): the results to keep."""
    regex = ".*".join(re.escape(part) for part in pattern.split("*"))
    return re.fullmatch(regex, sig, flags=re.DOTALL) is not None


@settings(max_examples=300, deadline=None)
@given(pattern=st.text(alphabet="ab*.[]?N ", max_size=14),
       sig=st.text(alphabet="ab.[]?N ", max_size=14))  # fmt: skip
def test_signature_matches_gives_the_regex_results(pattern, sig):
    assert b.signature_matches(pattern, sig) == _regex_matches(pattern, sig)


def test_signature_matches_the_shipped_signatures_as_before():
    """Every shipped signature against texts it should and should not match: the same results
    as the regex matcher."""
    for path in DEFAULT_EXPECTATIONS:
        for finding in load_expectations(path).findings:
            pattern = finding.signature
            for sig in (pattern.replace("*", ""), pattern.replace("*", "x * [N] y"),
                        pattern.replace("*", "") + "tail", "head" + pattern, ""):  # fmt: skip
                assert b.signature_matches(pattern, sig) == _regex_matches(pattern, sig)


def test_signature_matching_time_is_bounded_on_a_pathological_pattern():
    """Seven stars on a 60-character reason: the regex backtracked for tens of seconds (52 s
    with a few more stars); segment by segment it is microseconds, and a thousand stars on
    ten thousand characters stay far under the bound."""
    for pattern, sig in (("*a" * 7 + "*b", "a" * 60), ("*a" * 1000 + "*b", "a" * 10_000)):
        start = time.perf_counter()
        assert not b.signature_matches(pattern, sig)
        assert time.perf_counter() - start < 0.5


# --- baselines validated before any job -------------------------------------------------------
FINDING = {"id": "a", "cells": {"model": "mlp"}, "status": "fail", "signature": "x"}
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}]\n"
    for i in range(9)
)


@pytest.mark.parametrize(
    ("text", "field", "why"),
    [
        (BOMB, "", "alias *a"),
        (yaml.safe_dump({"torch": "2.13.0", "measured": [GRID], "findings": 5}), "findings",
         "expected a list, got a number"),
        (yaml.safe_dump({"torch": "2.13.0", "measured": [GRID],
                         "findings": [{**FINDING, "id": ["a", "b"]}]}),
         "findings.0.id", "expected a non-empty string, got a list"),
        (yaml.safe_dump({"torch": "2.13.0", "measured": [GRID],
                         "findings": [{**FINDING, "signature": 5}]}),
         "findings.0.signature", "expected a string, got a number"),
        ("torch: '2.13.0'\nmeasured: []\nfindings: []\ntorch: '2.14.1'\n", "",
         "duplicate key 'torch'"),
        (yaml.safe_dump({"torch": "2.13.0", "measured": [GRID],
                         "findings": [{**FINDING, "status": "broken"}]}),
         "findings.0.status", "'broken' is not a status"),
        (yaml.safe_dump({"torch": "2.13.0", "measured": [GRID],
                         "findings": [{**FINDING, "count": True}]}),
         "findings.0.count", "expected a count of cells"),
        (yaml.safe_dump({"torch": "2.13.0", "measured": [GRID], "findings": [FINDING, {**FINDING, "cells": {"mode": "full"}}]}),
         "findings.1.id", "'a' repeats findings.0"),
        (yaml.safe_dump({"torch": "2.13.0", "covers": {"model": "mlp"}, "findings": []}),
         "covers", "replaced by 'measured'"),
        (yaml.safe_dump({"torch": "2.13.0", "measured": [], "findings": []}), "measured",
         "no grid"),
        (yaml.safe_dump({"torch": "2.13.0", "measured": [{**GRID, "mode": ["shardd"]}],
                         "findings": []}),
         "measured.0.mode", "unknown mode 'shardd'"),
        (yaml.safe_dump({"torch": "2.13.0", "measured": [{**GRID, "pairs": [["single", "x"]]}],
                         "findings": []}),
         "measured.0.pairs.0.1", "unknown layout 'x'"),
        (yaml.safe_dump({"torch": "2.13.0", "findings": [],
                         "measured": [{**GRID, "layouts": {"single": {"framework": "single",
                                                                      "mesh": [2]}}}]}),
         "measured.0.layouts.single.mesh", "at most 1 process"),
        ("[" * 100_000, "", "nested deeper than 32 levels"),
        ("a:\n" + "".join(" " * i + "- \n" for i in range(1, 200)), "",
         "nested deeper than 32 levels"),
        ("x" * (1 << 21), "", "larger than"),
    ],
    ids=["bomb", "findings-5", "list-id", "int-signature", "duplicate-key", "status", "count",
         "repeated-id", "covers", "no-grid", "axis-value", "pair", "mesh", "deep-flow",
         "deep-block", "large"],
)  # fmt: skip
def test_a_bad_expectations_file_is_refused_in_one_line(tmp_path, text, field, why):
    path = write(tmp_path, text)
    start = time.perf_counter()
    with pytest.raises(ExpectationsError) as info:
        load_expectations(path)
    message = str(info.value)
    assert time.perf_counter() - start < 5
    assert message.startswith(f"{path}: {field}") and why in message, message
    assert "\n" not in message


def test_the_baseline_is_checked_with_the_config_before_any_job(tmp_path, small_config):
    """config validation (check-config, the Snakefile's Plan) reads the baseline whole: a file
    the gate could not use stops the run before a job, naming the file and the field."""
    path = write(tmp_path, {"torch": "2.13.0", "measured": [GRID], "findings": 5})
    bad = {**small_config, "baseline": str(path)}
    expected = f"baseline: {path}: findings: expected a list, got a number"
    with pytest.raises(config.ConfigError, match=re.escape(expected)):
        config.validate(bad)
    with pytest.raises(config.ConfigError, match=re.escape(expected)):
        Plan(bad, str(REPO))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(SystemExit) as exit_:
        cli_main(["check-config", str(tmp_path / "bad.yaml")])
    assert exit_.value.code == 1


def matrix_file(tmp_path, rows: list[dict], name="m.parquet") -> Path:
    path = tmp_path / name
    pd.DataFrame(rows).to_parquet(path)
    return path


def test_a_baseline_matrix_is_checked_before_any_job(tmp_path, small_config):
    """A matrix baseline whose statuses are null would make every cell new; an empty one, or a
    file that is not Parquet, could judge nothing: each is refused in one line."""
    nulls = matrix_file(tmp_path, [cell(status=None), cell(load="ddp_2", status=None)], "n.parquet")
    empty = matrix_file(tmp_path, [cell()], "e.parquet")
    pd.read_parquet(empty).iloc[0:0].to_parquet(empty)
    (tmp_path / "text.parquet").write_text("not parquet")
    short = matrix_file(tmp_path, [{"model": "mlp", "status": "pass"}], "s.parquet")
    for path, why in ((nulls, "status: 2 of 2 row(s) of the baseline matrix have no status"),
                      (empty, "the baseline matrix has no cells"),
                      (tmp_path / "text.parquet", "cannot read the baseline matrix as Parquet"),
                      (short, "the baseline matrix lacks column(s) save_layout, load_layout")):  # fmt: skip
        with pytest.raises(config.ConfigError) as info:
            config.validate({**small_config, "baseline": str(path)})
        assert f"baseline: {path}: {why}" in str(info.value)


# --- the gate judges only what its baseline measured ---------------------------------------------
def test_a_cell_outside_the_measured_grids_is_new(tmp_path):
    """A measured model and layout names, but another axis value, or a layout of the same name
    with another mesh: not measured, not judged."""
    exp = b.load_expectations(write(tmp_path, EXPECTATIONS))
    run = pd.DataFrame([
        cell("mlp", status="crash", reason="x"),  # measured: a regression
        cell("mlp", status="crash", reason="x", load_init="meta"),  # no grid has meta
        cell("mlp", status="crash", reason="x", save_mesh="4", save_world_size=4),
        cell("mlp", status="crash", reason="x", optimizer="sgd"),
    ])  # fmt: skip
    comparison = b.compare(run, exp)
    assert list(comparison.cells.comparison) == ["regression", "new", "new", "new"]
    assert list(comparison.cells.judged_by) == ["baseline", "", "", ""]


def grid_matrix(cfg: dict, outcome) -> pd.DataFrame:
    """The cells the pipeline's grid makes of ``cfg`` (pipeline_lib.plan.grid.cells), with the status
    and reason its jobs give a skip (grid.skip_reason of each side, records.verdict's words)
    and ``outcome(cell)`` -> (status, reason) for the others."""
    rows = []
    for c in grid.cells(config.validate(cfg)):
        skips = [grid.skip_reason(c.variant, side, layout)
                 for side, layout in (("save", c.save), ("load", c.load))]  # fmt: skip
        if any(skips):
            results = [typed(status="skip" if r else "ok", reason=r or "")
                       for typed, r in zip((SaveResult, LoadResult), skips, strict=True)]  # fmt: skip
            status, reason = records.verdict(*results, 0.0)
        else:
            status, reason = outcome(c)
        row = {"model": c.model, "status": status, "reason": reason,
               "save_torch_version": "2.13.0+cpu", "load_torch_version": "2.13.0+cpu",
               **c.variant.to_dict()}  # fmt: skip
        for side, layout in (("save", c.save), ("load", c.load)):
            row |= {f"{side}_{k}": v for k, v in layout.to_dict().items()
                    if k in ("framework", "world_size")}  # fmt: skip
            row |= {f"{side}_layout": layout.name, f"{side}_mesh": "x".join(map(str, layout.mesh)),
                    f"{side}_pp_schedule": layout.schedule,
                    f"{side}_microbatches": layout.microbatches}  # fmt: skip
        rows.append(row)
    return pd.DataFrame(rows)


FOUR_LAYOUTS = {name: LAYOUTS[name] for name in ("single", "ddp_2", "fsdp1_2", "fsdp2_2")}
# What tied_embedding gave on torch 2.13.0+cpu in modes full and non_strict with load_init meta
# (2026-12-07, run.cell_timeout_s 60; expectations/torch-2.13.0.yaml), by (mode, load layout).
# Into ddp_2 and fsdp1_2 in mode full: rank 0 raises in the broadcast, the other rank waits.
SEGFAULT = "save: rank 0 killed by SIGSEGV during state dict"
MEASURED_TIED = {
    ("full", "single"): ("error", "load: RuntimeError: Missing optimizer state for parameter "
                         "'output.weight' in checkpoint. The parameter requires gradients but "
                         "has no saved optimizer state. To load anyway, use "
                         "StateDictOptions(strict=False)."),
    ("full", "ddp_2"): ("error", "load: rank 0 raised during cell {save}: RuntimeError: Missing "
                        "optimizer state for parameter 'output.weight' in checkpoint. The "
                        "parameter requires gradients but has no saved optimizer state. To load "
                        "anyway, use StateDictOptions(strict=False). (the other ranks waited: no "
                        "progress for 20 s; job killed)"),
    ("full", "fsdp2_2"): ("fail", "resume: loss differs by 8.62e+17 (relative) at resume step "
                          "0, above resume_rtol 1e-05"),
    ("non_strict", "single"): ("fail", "loader vs saver: 4 of 36 entries differ; first "
                               "optim.param_groups.0.params: as a set: lists differ: 5 items "
                               "!= 6; first at index 5: (end) != 'output.weight'"),
    ("non_strict", "ddp_2"): ("fail", "loader vs saver: 5 of 37 entries differ; first "
                              "model.block.fc1.bias: not in the saver's state; non-strict load: "
                              "reported missing [model.module.block.fc1.bias], the saver left "
                              "out [model.block.fc1.bias]"),
    ("non_strict", "fsdp2_2"): ("pass", ""),
}  # fmt: skip
MEASURED_TIED[("non_strict", "fsdp1_2")] = MEASURED_TIED[("non_strict", "single")]
MEASURED_TIED[("full", "fsdp1_2")] = MEASURED_TIED[("full", "ddp_2")]


def _product_outcome(c) -> tuple[str, str]:
    if c.variant.mode == "full" and c.save.framework == "fsdp1":
        return "crash", SEGFAULT
    if c.model == "mlp":
        return "pass", ""
    status, reason = MEASURED_TIED[(c.variant.mode, c.load.name)]
    return status, reason.format(save=c.save.name)


def test_a_product_grid_is_judged_only_where_measured():
    """The covered models x single, ddp_2, fsdp1_2, fsdp2_2 x modes full, non_strict x every
    format x load_init meta, combine_axes product (320 cells) against the shipped 2.13.0 file:
    the grid's own skips (a format other than dcp is tested in mode sharded only) are judged
    by the pipeline's rule, tied_embedding's cells by the findings measured on them, mlp's
    (never measured in these modes with meta) are new. On the former gate: 52 regression,
    221 changed, 4 fixed, 43 same."""
    cfg = {"models": ["mlp", "tied_embedding"], "layouts": FOUR_LAYOUTS,
           "mode": ["full", "non_strict"], "load_init": ["meta"], "combine_axes": "product",
           "format": ["dcp", "safetensors", "safetensors_consolidated", "torch_save",
                       "torch_save_to_dcp"]}  # fmt: skip
    matrix = grid_matrix(cfg, _product_outcome)
    assert len(matrix) == 320
    comparison = b.compare(matrix, b.load_baseline(REPO / "expectations" / "torch-2.13.0.yaml"))
    code, lines = b.gate_lines(comparison)
    assert code == 0, "\n".join(lines[:20])
    assert comparison.counts() == {"regression": 0, "changed": 0, "fixed": 0, "new": 32,
                                   "same": 288}  # fmt: skip
    assert comparison.judged_by("pipeline") == 256 and comparison.judged_by("baseline") == 32
    new = comparison.cells[comparison.cells.comparison == "new"]
    assert set(new.model) == {"mlp"} and set(new.format) == {"dcp"}
    assert lines[-1].startswith("gate passed against expectations")


def test_the_pipelines_own_skips_are_judged_by_its_rule(tmp_path):
    """A skip the grid decides is expected whatever the file says (the file measured no such
    cell here); a cell the grid skips that gave another reason, or ran, is not that skip; a
    cell whose save side skipped first (a skip its save job decided) is judged by the file."""
    grids = [{**GRID, "format": ["dcp", "torch_save"]}]
    exp = b.load_expectations(write(tmp_path, {**EXPECTATIONS, "measured": grids}))
    rule = "save layout: format safetensors is tested with mode sharded only (mode full)"
    torch_save = "load layout: format torch_save is loaded in a single-process layout only"
    tp_skip = "save layout: TP degree 3 does not divide transformer heads=4"
    save_error = "save: RuntimeError: a and b must have same reduction dim (during train)"
    run = pd.DataFrame([
        cell("mlp", status="skip", reason=rule, mode="full", format="safetensors"),
        cell("mlp", status="skip", reason="save layout: other", mode="full", format="safetensors"),
        cell("mlp", status="pass", mode="full", format="safetensors"),
        cell("mlp_frozen", load="ddp_2", status="skip", reason=torch_save + " (world size 1)",
             format="torch_save"),
        cell("mlp", load="ddp_2", status="skip", reason=tp_skip, format="torch_save"),
        # the save job failed first (torch's error): its status, not the load side's skip
        cell("mlp", load="ddp_2", status="error", reason=save_error, format="torch_save"),
    ])  # fmt: skip
    comparison = b.compare(run, exp)
    assert list(comparison.cells.comparison) == [
        "same", "changed", "fixed", "same", "same", "changed"
    ]  # fmt: skip
    assert list(comparison.cells.judged_by) == ["pipeline"] * 4 + ["baseline"] * 2
    # the file's skip finding judges both (the last: it expected a skip, the save errored)
    assert list(comparison.cells.baseline_finding.iloc[4:]) == ["unused"] * 2
    # the same rule against a matrix baseline that never had these cells
    old = pd.DataFrame([cell("mlp", status="pass")])
    assert list(b.compare(run, old).cells.comparison) == [
        "same", "changed", "fixed", "same", "new", "new"
    ]  # fmt: skip


def test_every_shipped_grid_and_finding_is_measured():
    """Each measured grid expands to the cell count its ``run`` states; every finding that is
    not the pipeline's own (by_design) matches a cell of its file's grids the grid does not
    skip: a file claims nothing about cells its release did not run."""
    for path in DEFAULT_EXPECTATIONS:
        exp = load_expectations(path)
        for grid_ in exp.measured:
            assert f"{grid_.size} cells" in grid_.run, (path, grid_.run)
        rows = [row for grid_ in exp.measured for row in _grid_rows(grid_)]
        for finding in exp.findings:
            if not finding.by_design:
                assert any(finding.matches(r) for r in rows), (path, finding.id)


def _grid_rows(grid_) -> list[dict]:
    """One row per cell of a measured grid, with the columns a finding matches on (the grid's
    own skips left out)."""
    rows = []
    for model in grid_.models:
        for save, load in grid_.layout_pairs:
            for variant in grid_.variants:
                row = {"model": model, **variant.to_dict(), "save_framework": save[0],
                       "load_framework": load[0], "save_world_size": _size(save[1]),
                       "load_world_size": _size(load[1])}  # fmt: skip
                if b.planned_skip(row) is None:
                    rows.append(row)
    return rows


def _size(mesh: str) -> int | None:
    """A mesh's world size; None for an existing checkpoint's side (no mesh)."""
    return math.prod(int(n) for n in mesh.split("x")) if mesh else None


# --- the gate passes on nothing --------------------------------------------------------------
def test_the_gate_fails_on_an_empty_matrix_and_on_nothing_measured(tmp_path, capsys):
    exp = write(tmp_path, EXPECTATIONS)
    empty = matrix_file(tmp_path, [cell()], "empty.parquet")
    pd.read_parquet(empty).iloc[0:0].to_parquet(empty)
    ok = tmp_path / "gate.ok"
    assert b.gate(str(empty), str(exp), ok_path=str(ok)) == 1
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.endswith(": the matrix has no cells: nothing was compared")
    assert not ok.exists()
    unmeasured = matrix_file(tmp_path, [cell("mlp_frozen"), cell("mlp_frozen", load="ddp_2")])
    assert b.gate(str(unmeasured), str(exp), ok_path=str(ok)) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("gate FAILED") and "measured none of the 2 cell(s)" in out[-1]
    assert not ok.exists()
    measured = matrix_file(tmp_path, [cell("mlp"), cell("mlp_frozen")], "measured.parquet")
    assert b.gate(str(measured), str(exp), ok_path=str(ok)) == 0
    assert ok.read_text().startswith("gate passed") and "1 new, 1 same" in ok.read_text()


@pytest.mark.parametrize("which", ["matrix", "baseline"])
def test_the_gate_on_a_bad_parquet_says_so_in_one_line(tmp_path, capsys, which):
    """The command's whole output is one line naming the file (an exception would propagate
    here instead), exit status 2."""
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really")
    good = matrix_file(tmp_path, [cell()])
    matrix, baseline = (bad, good) if which == "matrix" else (good, bad)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["gate", "--matrix", str(matrix), "--baseline", str(baseline)])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and out == ""
    assert err.startswith(f"gate: {bad}: cannot read the ") and len(err.splitlines()) == 1


def test_read_matrix_names_the_file(tmp_path):
    (tmp_path / "folder.parquet").mkdir()
    with pytest.raises(MatrixFileError, match=r"folder\.parquet: the matrix is not a file"):
        read_matrix(tmp_path / "folder.parquet")
    old = pd.DataFrame([cell()]).drop(columns=["load_mode", "save_sequence"])
    old.to_parquet(tmp_path / "old.parquet")
    assert list(read_matrix(tmp_path / "old.parquet")[["load_mode", "save_sequence"]].iloc[0]) == [
        "same", "once"
    ]  # fmt: skip


# --- what the gate prints from data is escaped --------------------------------------------------
HOSTILE = "x\n::error title=pwned::owned\r\x1b[2J\x1b[31mred\u202ereversed"


def test_the_gate_prints_no_command_and_no_escape_from_the_results(tmp_path):
    """A reason, a model's and a layout's name of a crafted matrix: its newlines, carriage
    returns, ANSI escapes and bidirectional overrides are shown as escapes, and no line starts
    with ``::`` (a GitHub Actions workflow command)."""
    exp = b.load_expectations(write(tmp_path, EXPECTATIONS))
    run = pd.DataFrame([
        cell("mlp", status="crash", reason=HOSTILE),
        cell("mlp", load="ddp_2", status="fail", reason="::warning::y"),
        cell("mlp\x1b[0m", status="fail", reason="z"),
    ])  # fmt: skip
    code, lines = b.gate_lines(b.compare(run, exp), fail_on_new=True)
    text = "\n".join(lines)
    assert code == 1 and lines[2].startswith("NEW: mlp\\x1b[0m ddp_2 -> single")
    assert not re.search(r"[\x00-\x1f\x7f\u202e]", text.replace("\n", ""))
    assert not any(line.lstrip().startswith("::") for line in text.splitlines())
    assert "x\\x0a::error title=pwned::owned\\x0d\\x1b[2J\\x1b[31mred\\u202ereversed" in lines[0]
    assert "mlp\\x1b[0m" in text


def test_a_line_of_data_never_starts_a_workflow_command():
    from pipeline_lib.results import display

    assert display.line("::error::x") == "%3A%3Aerror::x"
    assert display.line("  ::set-output name=a::b") == "  %3A%3Aset-output name=a::b"
    assert display.lines("a\n ::error::x\nb::c\t") == "a\n %3A%3Aerror::x\nb::c\t"
    assert display.line("a\x00b\x7fc\u2028d") == "a\\x00b\\x7fc\\u2028d"
    assert display.fence("```\n````x") == "`````" and display.fence("plain") == "```"


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
        "format": ["dcp", "safetensors"],
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
