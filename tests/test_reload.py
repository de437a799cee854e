"""Reload in the same process (axis load_process): the saver's own process
loads its checkpoint right after the save into its model and optimizer, trained on since, as a
trainer resumes after an evaluation."""

from __future__ import annotations

import pytest

from pipeline_lib.plan import grid
from pipeline_lib.plan.axes import Variant
from tests.jobs import run_grid

FSDP2_AND_DDP = {
    "models": ["mlp"],
    "layouts": {
        "fsdp2_2": {"framework": "fsdp2", "mesh": [2]},
        "ddp_2": {"framework": "ddp", "mesh": [2]},
    },
    "pairs": [["fsdp2_2", "fsdp2_2"], ["ddp_2", "fsdp2_2"]],
    "run": {"cell_timeout_s": 120},
    "load_process": ["fresh", "saver"],
}
SAVER = "load_process-saver"


def test_fresh_is_the_default_and_saver_skips_a_meta_init():
    assert Variant(load_process="fresh").id == ""
    assert Variant(load_process="saver").id == SAVER
    layout = grid.Layout("x", "fsdp2", (2,), ("shard",), None)
    reason = grid.skip_reason(Variant(load_process="saver", load_init="meta"), "save", layout)
    assert reason == "load_process saver reuses the saver's model: load_init meta does not apply"


@pytest.mark.torchrun
def test_the_saver_reloads_its_own_checkpoint_bit_for_bit(in_tmp):
    rows = run_grid(FSDP2_AND_DDP)
    same = rows[SAVER, "mlp", "fsdp2_2", "fsdp2_2"]
    assert (same["status"], same["reason"]) == ("pass", ""), same["reason"]
    assert same["load_process"] == "saver" and same["entries_checked"] > 10
    assert same["entries_mismatched"] == 0 and same["resume_max_rel_diff"] is not None
    assert same["load_seconds"] > 0
    across = rows[SAVER, "mlp", "ddp_2", "fsdp2_2"]
    assert (across["status"], across["reason"]) == (
        "skip",
        "load layout: load_process saver: the saver's own process loads under its own layout only",
    )
    assert rows["", "mlp", "ddp_2", "fsdp2_2"]["status"] == "pass"


@pytest.mark.torchrun
def test_a_saver_that_does_not_reload_fails_check_2(in_tmp):
    cfg = {**FSDP2_AND_DDP, "pairs": [["fsdp2_2", "fsdp2_2"]], "load_process": ["saver"]}
    row = run_grid(cfg, save_fault="skip_load")[SAVER, "mlp", "fsdp2_2", "fsdp2_2"]
    # Its model and optimizer trained on after the save: without the load they differ.
    assert row["status"] == "fail", row["reason"]
    assert row["reason"].startswith("loader vs saver: "), row["reason"]
    assert "bytes differ" in row["reason"]
