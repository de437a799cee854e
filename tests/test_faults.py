"""The fault campaign: every injected fault gets its expected status and a reason that names the
file, entry, rank or signal; a fault the verifier misses fails the run loudly."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline_lib.results import selftest
from pipeline_lib.verify import faults
from tests.conftest import REPO
from tests.test_snakemake import snakemake

ENTRY = "model.blocks.0.fc1.bias"  # the first tensor entry of mlp, where checkpoint faults land
FILES = "files vs saver: 1 of 52 entries differ; first " + ENTRY
STATE = "state dict vs live:"
EXP_AVG = "optim.state.blocks.0.fc1.bias.exp_avg"
EXPECTED_REASONS = {
    "flip_byte": f"{FILES}: bytes differ",
    "truncate_shard": "files vs saver: ",  # every entry stored in the cut part of the shard
    "delete_shard": "files vs saver: ",
    "delete_metadata": "files vs saver: cannot read checkpoint results/faults/delete_metadata",
    "drop_entry": f"{FILES}: missing in the checkpoint",
    "change_shape": f"{FILES}: shape [32] != [33]",
    "change_dtype": f"{FILES}: dtype torch.float32 != torch.float64",
    "foreign_checkpoint": "load: CheckpointException on rank(s) [0, 1]: ",
    # State faults: the same wrong state dict on both sides; only check 0 can see it.
    "alias_optim_state": f"{STATE} 2 of 52 entries differ; first {EXP_AVG}: shares storage "
    f"with {EXP_AVG}_sq, which the model does not tie",
    "swap_entries": f"{STATE} 2 of 52 entries differ; first {ENTRY}: bytes differ",
    "stale_param": f"{STATE} 1 of 52 entries differ; first {ENTRY}: bytes differ",
    "skip_load": "loader vs saver: ",
    "drop_loaded_entry": f"loader vs saver: 1 of 52 entries differ; first {ENTRY}: missing in the loader's state",
    "skew_resume_lr": "resume: loss differs by ",
    "kill_rank_save": "save: rank 1 killed by SIGKILL during save",
    "kill_rank_load": "load: rank 1 killed by SIGKILL during cell ddp_2",
    "segfault_save": "save: rank 0 killed by SIGSEGV during save",
    "segfault_load": "load: rank 0 killed by SIGSEGV during cell ddp_2",
    "hang_save": "save: no progress for 20 s during save; job killed",
    "hang_load": "load: no progress for 20 s during cell ddp_2; job killed",
    # A save sequence (steps 2 and 4, the cells load the last): the step is named.
    "stale_save": "files vs saver at step 4: 40 of 52 entries differ; first " + ENTRY,
    "future_save": "files vs saver at step 2: 40 of 52 entries differ; first " + ENTRY,
}


def test_every_fault_has_an_expected_reason():
    # The faults that break a seal: tests/test_sealed.py (sealed mode only).
    assert set(EXPECTED_REASONS) == set(faults.campaign({}))


@pytest.mark.e2e
def test_fault_campaign(tmp_path):
    (tmp_path / "config.yaml").write_text((REPO / "configs" / "selftest.yaml").read_text())
    snakemake(tmp_path)
    table = pd.read_parquet(tmp_path / "results" / "selftest.parquet").set_index("fault")
    assert set(table.index) == set(faults.campaign({}))
    for fault, row in table.iterrows():
        assert row.status == faults.FAULTS[fault].expect, (fault, row.reason)
        assert row.reason.startswith(EXPECTED_REASONS[fault]), (fault, row.reason)
        assert row.caught
    assert "unreadable" in table.loc["truncate_shard", "reason"]
    stuck = f"save sequence: 40 of 52 entries differ; first {ENTRY}: equal in the checkpoints "
    assert stuck + "of steps 2 and 4" in table.loc["stale_save", "reason"]
    assert "FileNotFoundError" in table.loc["delete_shard", "reason"]
    assert (
        "Missing key" in table.loc["foreign_checkpoint", "reason"]
        or "Size mismatch" in table.loc["foreign_checkpoint", "reason"]
    )
    summary = (tmp_path / "results" / "selftest.md").read_text()
    assert summary.startswith(
        f"# Fault campaign: {len(EXPECTED_REASONS)} of {len(EXPECTED_REASONS)} faults caught"
    )


def test_a_missed_fault_fails_loudly(tmp_path, capsys):
    rows = [
        {"fault": "flip_byte", "model": "mlp", "save_layout": "a", "load_layout": "b", "expected": "fail",
         "status": "pass", "caught": False, "reason": ""},
        {"fault": "hang_load", "model": "mlp", "save_layout": "a", "load_layout": "b", "expected": "timeout",
         "status": "timeout", "caught": True, "reason": "load: no progress"},
    ]  # fmt: skip
    pd.DataFrame(rows).to_parquet(tmp_path / "selftest.parquet")
    assert selftest.check(str(tmp_path / "selftest.parquet"), str(tmp_path / "ok")) == 1
    err = capsys.readouterr().err
    assert "SELF-TEST FAILED: the verifier missed 1 injected fault(s)" in err
    assert "flip_byte on mlp a -> b: expected fail, got pass" in err
    assert not (tmp_path / "ok").exists()
    assert "1 of 2 faults MISSED" in selftest.markdown(pd.DataFrame(rows))
