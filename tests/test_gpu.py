"""GPU readiness (marked ``gpu``; skipped without CUDA): the save and load jobs on cuda + nccl,
at world size 1 and, with two GPUs visible, 2; the async process checkpointer staging into
pinned memory. Run them on a GPU machine with ``pytest -m gpu``."""

from __future__ import annotations

import pytest
import torch

from tests.jobs import run_grid, run_matrix

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.torchrun,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
CUDA = {"device": "cuda", "backend": "nccl", "cell_timeout_s": 300}
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


def _assert_all_pass(rows: dict) -> None:
    for key, row in rows.items():
        assert (key, row["status"], row["reason"]) == (key, "pass", "")
        assert row["device"] == "cuda" and row["backend"] == "nccl", row
        assert row["entries_checked"] > 10 and row["entries_mismatched"] == 0


def test_single_process_save_and_load_on_cuda(in_tmp):
    cfg = {"models": ["transformer"], "layouts": {"single": {"framework": "single", "mesh": [1]}},
           "run": CUDA}  # fmt: skip
    rows = run_matrix(cfg, model="transformer")
    assert set(rows) == {("single", "single")}
    _assert_all_pass(rows)


@TWO_GPUS
def test_two_rank_layouts_across_each_other_on_cuda(in_tmp):
    layouts = {
        "single": {"framework": "single", "mesh": [1]},
        "fsdp2_2": {"framework": "fsdp2", "mesh": [2]},
        "tp_2": {"framework": "tp", "mesh": [2]},
        "fsdp1_2": {"framework": "fsdp1", "mesh": [2]},
    }
    rows = run_matrix({"models": ["transformer"], "layouts": layouts, "run": CUDA}, "transformer")
    assert len(rows) == 16
    _assert_all_pass(rows)


def test_async_process_checkpointer_with_pinned_staging(in_tmp):
    """The checkpoint must equal the saver's state at the save, although training moved on while
    the background process wrote it from pinned memory."""
    cfg = {"models": ["mlp"], "layouts": {"single": {"framework": "single", "mesh": [1]}},
           "async_save": ["process_pinned"], "run": CUDA}  # fmt: skip
    rows = run_grid(cfg)
    assert len(rows) == 1
    _assert_all_pass(rows)
    (row,) = rows.values()
    assert row["async_save"] == "process_pinned"
    assert 0 < row["save_blocked_seconds"] <= row["save_seconds"]
