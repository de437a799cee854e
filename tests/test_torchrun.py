"""Real multi-process torchrun jobs: good checkpoints pass bit for bit across layouts, and a
failing cell never takes the others with it. (Every fault kind: tests/test_faults.py.)"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import pytest

from pipeline_lib.plan import config, grid
from pipeline_lib.verify.results import LoadRecord, SaveRecord
from tests import procs
from tests.conftest import REPO
from tests.jobs import cli, run_matrix, tensors
from tests.record_schemas import read_checked

pytestmark = pytest.mark.torchrun

DDP_TO_FSDP2 = {
    "models": ["mlp"],
    "layouts": {
        "ddp_2": {"framework": "ddp", "mesh": [2]},
        "fsdp2_2": {"framework": "fsdp2", "mesh": [2]},
    },
    "pairs": [["ddp_2", "fsdp2_2"]],
    "run": {"cell_timeout_s": 120},
}
CELL = ("ddp_2", "fsdp2_2")


def test_cross_layout_cells_pass_bit_for_bit(in_tmp, monkeypatch):
    # As under Snakemake, which gives every rank the job's whole thread count.
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    cfg = {
        "models": ["tied_embedding"],
        "layouts": {
            "fsdp1_hybrid_1x2": {"framework": "fsdp1_hybrid", "mesh": [1, 2]},
            "fsdp2_tp_1x2": {"framework": "fsdp2_tp", "mesh": [1, 2]},
            "fsdp2_3": {"framework": "fsdp2", "mesh": [3]},
        },
        "pairs": [["fsdp1_hybrid_1x2", "fsdp2_tp_1x2"], ["fsdp2_tp_1x2", "fsdp2_3"]],
    }
    rows = run_matrix(cfg, model="tied_embedding")
    for row in rows.values():
        assert (row["status"], row["reason"]) == ("pass", "")
        assert row["entries_checked"] > 10 and row["entries_mismatched"] == 0
        assert row["checkpoint_files"] >= 3 and row["checkpoint_bytes"] > 0
    entries = {t["entry"]: t for t in tensors("tied_embedding", "fsdp2_3")}
    assert entries["model.feature_scale"]["kind"] == "buffer"
    assert "model.position_bias" not in entries  # not persistent
    assert (
        entries["model.output.weight"]["equal"]
        and entries["model.embedding.weight"]["kind"] == "param"
    )
    assert entries["optim.state.block.fc1.weight.step"]["kind"] == "optim.step"
    assert all(t["equal"] for t in entries.values())
    # The launcher shares the job's 2 threads among its 2 ranks, served by the fork server.
    save = read_checked(grid.save_record_path("tied_embedding", "fsdp1_hybrid_1x2"), SaveRecord)
    assert save.env.threads_per_rank == 1
    assert save.env.rank_start == "forkserver"


def test_ranks_started_as_fresh_processes_pass_too(in_tmp, monkeypatch):
    # DCP_MATRIX_RANK_START=exec: every rank a `python -m pipeline_lib.job.worker`, as torchrun
    # starts a script; a rank that dies still fails its cell as a crash.
    monkeypatch.setenv("DCP_MATRIX_RANK_START", "exec")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    cfg = {**DDP_TO_FSDP2, "pairs": [["ddp_2", "fsdp2_2"], ["ddp_2", "ddp_2"]]}
    rows = run_matrix(cfg, load_faults={("ddp_2", "ddp_2"): "kill_rank_load"})
    assert (rows[CELL]["status"], rows[CELL]["reason"]) == ("pass", "")
    assert (rows["ddp_2", "ddp_2"]["status"], rows["ddp_2", "ddp_2"]["reason"]) == (
        "crash", "load: rank 1 killed by SIGKILL during cell ddp_2",
    )  # fmt: skip
    save = read_checked(grid.save_record_path("mlp", "ddp_2"), SaveRecord)
    assert (save.env.rank_start, save.env.threads_per_rank) == ("exec", 1)


# The fork server started with one environment; the job changes it before it launches.
SERVED = """
import json, os, psutil
os.environ.update(PROBE="at server start", GONE="1", OMP_NUM_THREADS="2")
from pipeline_lib.job import launcher
launcher.start_rank_server()
os.environ["PROBE"] = "at launch"
del os.environ["GONE"]
args = launcher._prepare_torchrun(["--standalone", "--nproc-per-node=2", "-m", "x", "a1"])
ranks = launcher._agent(args, target="tests.jobs:probe")
server = [p for p in psutil.Process().children() if launcher.is_fork_server(p)]
print(json.dumps({"ranks": ranks, "server_threads": [p.num_threads() for p in server]}))
"""


def test_served_ranks_run_with_the_jobs_environment_at_launch():
    proc = procs.run(
        [sys.executable, "-c", SERVED], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    ranks = {int(rank): view for rank, view in out["ranks"].items()}
    assert sorted(ranks) == [0, 1]
    for rank, view in ranks.items():
        env = view["env"]
        assert (env["PROBE"], env["RANK"], env["WORLD_SIZE"]) == ("at launch", str(rank), "2")
        assert "GONE" not in env and env["DCP_MATRIX_SERVED_RANK"] == "1"
        assert (view["args"], view["threads"]) == (["a1"], 1)  # the job's 2 threads shared
    # One thread: no other thread can hold a lock (glibc's resolver's) at a fork.
    assert out["server_threads"] == [1]


def test_flipped_bit_also_fails_the_loader_check(in_tmp):
    row = run_matrix(DDP_TO_FSDP2, save_faults={"ddp_2": "flip_byte"})[CELL]
    assert (
        "loader vs saver: 1 of 52 entries differ; first model.blocks.0.fc1.bias: bytes differ"
        in row["reason"]
    )
    assert 0 < row["max_abs_diff"] < 1e-6  # one ulp, still caught


def test_killed_saver_is_a_crash_for_its_cells_only(in_tmp):
    cfg = {**DDP_TO_FSDP2, "pairs": "all"}
    rows = run_matrix(cfg, save_faults={"ddp_2": "kill_rank_save"})
    for load in ("ddp_2", "fsdp2_2"):
        assert rows["ddp_2", load]["status"] == "crash"
        assert rows["ddp_2", load]["reason"] == "save: rank 1 killed by SIGKILL during save"
        assert rows["fsdp2_2", load]["status"] == "pass"


def test_crash_and_hang_in_a_load_job_keep_the_other_cells(in_tmp):
    cfg = {
        "models": ["mlp"],
        "layouts": {n: {"framework": "fsdp2", "mesh": [2]} for n in ("a", "b", "c", "d")},
        "pairs": [["a", "d"], ["b", "d"], ["c", "d"]],
        "run": {"cell_timeout_s": 20},
    }
    rows = run_matrix(cfg, load_faults={("a", "d"): "segfault_load", ("b", "d"): "hang_load"})
    assert (rows["a", "d"]["status"], rows["a", "d"]["reason"]) == (
        "crash", "load: rank 0 killed by SIGSEGV during cell a",
    )  # fmt: skip
    assert (rows["b", "d"]["status"], rows["b", "d"]["reason"]) == (
        "timeout", "load: no progress for 20 s during cell b; job killed",
    )  # fmt: skip
    assert rows["c", "d"]["status"] == "pass"


def test_a_crashed_item_keeps_the_other_items_of_its_job(in_tmp):
    """One save job runs every (variant, model) item: a rank killed in the first item makes
    that item a crash, and a fresh launch saves the rest."""
    cfg = config.validate(
        {
            "models": ["mlp", "mlp_uneven"],
            "layouts": {
                "ddp_2": {"framework": "ddp", "mesh": [2]},
                "single": {"framework": "single", "mesh": [1]},
            },
            "pairs": [["ddp_2", "single"]],
            "run": {"cell_timeout_s": 60},
        }
    )
    save = grid.save_job_spec(cfg, grid.RESULTS, "ddp_2")
    killed = replace(save.items[0], fault="kill_rank_save")
    cli("save", replace(save, items=(killed, *save.items[1:])))
    cli("load", grid.load_job_spec(cfg, grid.RESULTS, "single"))
    first, second = (
        read_checked(grid.load_record_path(m, "single"), LoadRecord) for m in cfg["models"]
    )
    ((crashed,), (passed,)) = first.cells, second.cells
    assert (crashed["model"], crashed["status"], crashed["reason"]) == (
        "mlp", "crash", "save: rank 1 killed by SIGKILL during save",
    )  # fmt: skip
    assert (passed["model"], passed["status"], passed["reason"]) == ("mlp_uneven", "pass", "")
    assert read_checked(grid.save_record_path("mlp_uneven", "ddp_2"), SaveRecord).status == "ok"
    killed = read_checked(grid.save_record_path("mlp", "ddp_2"), SaveRecord)
    assert (killed.status, killed.checkpoint_bytes, killed.state_check) == ("crash", None, None)
