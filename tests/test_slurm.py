"""The Slurm cluster profile (profiles/slurm) against a real single-node Slurm on localhost.

The ``slurm`` tests bring Slurm up with scripts/slurm_up.sh (installing Debian's packages if
missing: root needed; they fail rather than skip without it), run small grids through
``snakemake --profile profiles/slurm`` and stop every daemon they started, by PID. The other
tests check, without Slurm, what the profile's resources and the srun launcher become for a
multi-node GPU job (this machine has one node, so a multi-node run cannot happen here).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import psutil
import pytest
import yaml

from pipeline_lib.common.atomic import write_json
from pipeline_lib.job import launcher
from pipeline_lib.plan.config import ConfigError, validate
from pipeline_lib.plan.snakemake_view import Plan
from tests import procs
from tests.conftest import REPO

BIN = Path(sys.executable).parent
SNAKEMAKE_TIMEOUT_S = 600  # each run takes 2-3 min here, alone or beside other work
# The configuration scripts/slurm_up.sh writes: the cluster these tests bring up (the others
# run with a SLURM_CONF of no cluster, tests/conftest.py).
CLUSTER_ENV = {"SLURM_CONF": "/etc/slurm/slurm.conf"}
KEYS = ["model", "save_layout", "load_layout"]

GRID = {
    "models": ["mlp", "tied_embedding"],
    "layouts": {
        "single": {"framework": "single", "mesh": [1]},
        "ddp_2": {"framework": "ddp", "mesh": [2]},
        "fsdp2_2": {"framework": "fsdp2", "mesh": [2]},
    },
    "pairs": "all",
    "run": {"cell_timeout_s": 120},
}


class SlurmCluster:
    """A Slurm started by scripts/slurm_up.sh under ``base``; ``stop`` ends exactly the
    daemons it recorded (scripts/slurm_down.sh) and says which, if any, are still alive."""

    def __init__(self, base: Path):
        self.base = base
        self.env = {**os.environ, "SLURM_BASE": str(base), **CLUSTER_ENV}
        self.pids: dict[str, int] = {}

    def start(self) -> None:
        # As in a process that ran torchrun (it sets OMP_NUM_THREADS=1 in its own environment):
        # the node must still have every CPU, or jobs of 2 ranks never start.
        proc = procs.run(
            ["bash", str(REPO / "scripts" / "slurm_up.sh")],
            env={**self.env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        # Record what was started even when start-up failed half way, so that it is stopped.
        for pid_file in (self.base / "pids").glob("*.pid"):
            self.pids[pid_file.stem] = int(pid_file.read_text())
        assert proc.returncode == 0, f"slurm_up.sh failed:\n{proc.stdout}\n{proc.stderr}"
        assert {"slurmctld", "slurmd"} <= set(self.pids), self.pids
        cpus = procs.run(["sinfo", "-h", "-N", "-o", "%c"], env=self.env, capture_output=True,
                         text=True, timeout=60).stdout.split()  # fmt: skip
        assert cpus == [str(len(os.sched_getaffinity(0)))], f"node CPUs {cpus}"

    def alive(self) -> dict[str, int]:
        def running(pid: int) -> bool:
            try:
                return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return False

        return {name: pid for name, pid in self.pids.items() if running(pid)}

    def stop(self) -> dict[str, int]:
        procs.run(
            ["bash", str(REPO / "scripts" / "slurm_down.sh")],
            env=self.env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        for name, pid in self.alive().items():  # slurm_down.sh failed: stop ours by PID
            os.kill(pid, signal.SIGKILL)
            print(f"killed {name} ({pid}) left by slurm_down.sh", file=sys.stderr)
        deadline = time.monotonic() + 10  # a SIGKILL is not instant on a loaded machine
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.alive()


_BASES: list[Path] = []  # the clusters' folders (their daemons' logs), for diagnose()


def _tail(path: Path, chars: int = 1500) -> str:
    try:
        return f"--- {path}\n{path.read_text(errors='replace')[-chars:]}"
    except OSError as e:
        return f"--- {path}: {e}"


def _command(*argv: str) -> str:
    try:
        proc = procs.run(list(argv), capture_output=True, text=True, timeout=30,
                         env={**os.environ, **CLUSTER_ENV})  # fmt: skip
        lines = "\n".join(line[:200] for line in proc.stdout.splitlines())
        return f"$ {' '.join(argv)}\n{lines[-4000:]}\n{proc.stderr[-1000:]}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"$ {' '.join(argv)}: {e}"


def diagnose(workdir: Path) -> str:
    """What a run that did not finish left: Slurm's view of its jobs and node, the jobs' logs,
    the daemons' logs, the processes and listening ports of this machine."""
    parts = [
        _command("squeue", "-a", "-o", "%i %j %T %R %M %C"),
        _command("sinfo", "-N", "-l"),
        _command("scontrol", "show", "jobs"),
        _command(
            "ps",
            "--ppid",
            "2",
            "-p",
            "2",
            "--deselect",
            "-o",
            "pid,ppid,etimes,stat,pcpu,args",
            "--sort=-etimes",
        ),
        _command("ss", "-ltnp"),
    ]
    logs = sorted(workdir.glob(".snakemake/slurm_logs/**/*.log"))
    logs += sorted(workdir.glob("results/logs/**/*.log"))
    logs += [log for base in _BASES for log in sorted(base.glob("**/*.log"))]
    return "\n".join(parts + [_tail(log) for log in logs])


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    _BASES.append(cluster.base)
    try:
        cluster.start()
        yield cluster
    finally:
        left = cluster.stop()
        assert not left, f"Slurm daemons still running after slurm_down.sh: {left}"


def run_snakemake(workdir: Path, *args: str, env: dict | None = None) -> str:
    """Snakemake in ``workdir`` on ``workdir/config.yaml`` under a hard timeout: on expiry
    its whole process group is killed (the Slurm jobs are cancelled by slurm_down.sh)."""
    proc = subprocess.Popen(
        [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(workdir),
         "--configfile", str(workdir / "config.yaml"), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, **CLUSTER_ENV, **(env or {})},
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=SNAKEMAKE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        found = diagnose(workdir)  # before the kill: the jobs as they hung
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        print(found, file=sys.stderr)  # shown with the failure (captured stderr)
        pytest.fail(f"snakemake ran past {SNAKEMAKE_TIMEOUT_S} s:\n{out[-6000:]}")
    assert proc.returncode == 0, out[-6000:]
    return out


def slurm_run(workdir: Path, cfg: dict, env: dict | None = None) -> str:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run_snakemake(
        workdir,
        "--profile", str(REPO / "profiles" / "slurm"),
        # Poll early: every job here takes seconds, not hours.
        "--slurm-init-seconds-before-status-checks", "2",
        env=env,
    )  # fmt: skip


def slurm_jobs(cluster: SlurmCluster) -> pd.DataFrame:
    """Every job the cluster still knows (MinJobAge=3600 in scripts/slurm_up.sh): comment
    (rule, wildcards), state, CPUs and nodes."""
    out = procs.run(
        ["squeue", "-h", "--states=all", "-o", "%i|%k|%T|%C|%D"],
        env=cluster.env, capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    rows = [line.split("|") for line in out.splitlines() if line.strip()]
    return pd.DataFrame(rows, columns=["id", "comment", "state", "cpus", "nodes"])


@pytest.mark.slurm
def test_slurm_profile_runs_the_grid_like_a_workstation(slurm, tmp_path):
    t0 = time.monotonic()
    slurm_run(tmp_path / "slurm", GRID)
    slurm_s = time.monotonic() - t0
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "config.yaml").write_text(yaml.safe_dump(GRID))
    run_snakemake(tmp_path / "local", "--cores", "2")

    cols = [*KEYS, "status", "reason"]
    on_slurm = pd.read_parquet(tmp_path / "slurm" / "results" / "matrix.parquet")
    local = pd.read_parquet(tmp_path / "local" / "results" / "matrix.parquet")
    on_slurm = on_slurm[cols].sort_values(KEYS).reset_index(drop=True)
    local = local[cols].sort_values(KEYS).reset_index(drop=True)
    assert len(on_slurm) == 2 * 3 * 3
    pd.testing.assert_frame_equal(on_slurm, local)
    assert (on_slurm.status == "pass").all(), on_slurm[on_slurm.status != "pass"]

    # The torchrun jobs ran as Slurm jobs (one sbatch log each, one job per layout and side,
    # for both models) with the CPUs of their layout; aggregate and the report ran in the main
    # process.
    logs = tmp_path / "slurm" / ".snakemake" / "slurm_logs"
    for rule in ("save_checkpoints", "load_checkpoints"):
        assert len(list((logs / f"rule_{rule}").glob("*/*.log"))) == 3, rule
    assert not (logs / "rule_aggregate").exists()
    jobs = slurm_jobs(slurm)
    ours = jobs[jobs.comment.str.contains("_checkpoint")]
    assert len(ours) >= 6 and set(ours.state) == {"COMPLETED"}, jobs
    for layout, cpus in {"single": "1", "ddp_2": "2", "fsdp2_2": "2"}.items():
        assert set(ours[ours.comment.str.endswith(f"_{layout}")].cpus) == {cpus}, ours
    assert set(ours.nodes) == {"1"}
    print(f"Slurm run of {len(on_slurm)} cells: {slurm_s:.0f} s")


@pytest.mark.slurm
def test_srun_launcher_classifies_failures_on_slurm(slurm, tmp_path):
    """The multi-node launcher (srun, one torchrun agent per node, c10d rendezvous), forced
    onto this one-node cluster: a passing save, a killed rank and a hang keep their verdicts."""
    cfg = {
        "models": [],
        "layouts": {
            "single": {"framework": "single", "mesh": [1]},
            "ddp_2": {"framework": "ddp", "mesh": [2]},
        },
        "faults": [
            {"fault": "kill_rank_load", "model": "mlp", "save": "single", "load": "ddp_2"},
            {"fault": "hang_save", "model": "mlp", "save": "ddp_2", "load": "single"},
        ],
        "run": {"cell_timeout_s": 20},
    }
    slurm_run(tmp_path, cfg, env={launcher.LAUNCHER_ENV: "srun"})
    table = pd.read_parquet(tmp_path / "results" / "selftest.parquet")
    got = dict(zip(table.fault, zip(table.status, table.reason, strict=True), strict=True))
    assert got["kill_rank_load"][0] == "crash"
    assert "rank 1 killed by SIGKILL during cell single" in got["kill_rank_load"][1]
    assert got["hang_save"][0] == "timeout"
    assert "no progress for 20 s" in got["hang_save"][1]
    assert table.caught.all(), table
    logs = list((tmp_path / "results" / "logs").rglob("*.log"))
    assert any("launcher: srun --nodes=1" in p.read_text() for p in logs)


# --- without Slurm: what a multi-node GPU job becomes -----------------------------------------
class _Resources(dict):
    __getattr__ = dict.__getitem__


def _resources(plan: Plan, layout: str) -> _Resources:
    wc = SimpleNamespace(layout=layout)
    resources = plan.job_resources  # save_checkpoints, load_checkpoints
    values = {name: f(wc) for name, f in resources.items() if name not in ("ranks", "runtime")}
    values["runtime"] = resources["runtime"](wc, 1)
    return _Resources({k: v for k, v in values.items() if v is not None})


def _sbatch(plan: Plan, layout: str) -> str:
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    job = SimpleNamespace(resources=_resources(plan, layout), threads=plan.job_ranks(
        SimpleNamespace(layout=layout)))  # fmt: skip
    params = {"run_uuid": "u", "slurm_logfile": "l", "comment_str": "c", "account": "",
              "partition": "", "workdir": "/w"}  # fmt: skip
    return get_submit_command(job, params) + set_gres_string(job)


def _plan(gpus_per_node: int) -> Plan:
    cfg = {
        "models": ["mlp"],
        "layouts": {
            "single": {"framework": "single", "mesh": [1]},
            "fsdp2_4": {"framework": "fsdp2", "mesh": [4]},
            "fsdp2_8": {"framework": "fsdp2", "mesh": [8]},
            "hsdp_2x8": {"framework": "hsdp", "mesh": [2, 8]},
        },
        "train": {"global_batch": 16},
        "run": {"gpus_per_node": gpus_per_node},
    }
    return Plan(cfg, str(REPO))


def test_slurm_up_never_overwrites_a_configuration_it_did_not_write(tmp_path):
    """A real cluster's slurm.conf stays as it is: slurm_up.sh stops before it installs or
    starts anything, naming the file (SLURM_UP_CONF: the path it would write)."""
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=production\n")
    env = {**os.environ, "SLURM_BASE": str(tmp_path / "base"), "SLURM_UP_CONF": str(conf)}
    proc = procs.run(["bash", str(REPO / "scripts" / "slurm_up.sh")], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"slurm_up: {conf} exists and was not written by this script; not overwriting it"
    )
    assert conf.read_text() == "ClusterName=production\n"
    assert not (tmp_path / "base").exists()


def test_plan_leaves_the_callers_config_alone():
    raw = {"models": ["mlp"], "layouts": {"single": {"framework": "single", "mesh": [1]}}}
    before = yaml.safe_dump(raw)
    plan = Plan(raw, str(REPO))
    assert yaml.safe_dump(raw) == before  # Snakemake's config: no defaults filled in
    assert plan.config["run"]["gpus_per_node"] == 0 and plan.config["pairs"] == "all"


def test_each_rule_has_its_own_resources():
    plan = _plan(4)
    plan.config["faults"] = [{"fault": "delete_shard", "model": "mlp", "save": "single",
                              "load": "fsdp2_8"}]  # fmt: skip
    fault = SimpleNamespace(fault_id="delete_shard.mlp.single.fsdp2_8")
    load = {k: f(fault) for k, f in plan.fault_load_resources.items() if k != "runtime"}
    assert load["ranks"] == 8 and load["nodes"] == 2 and load["mpi"] == "srun"  # its load layout
    save = SimpleNamespace(fault_id=fault.fault_id, model="mlp", layout="single")
    assert plan.fault_save_resources["ranks"](save) == 1
    # A fault job has one item; a matrix job of the same layout runs every item (two here).
    plan.config["models"] = ["mlp", "mlp_uneven"]
    fault_minutes = plan.fault_save_resources["runtime"](save, 1)
    matrix = SimpleNamespace(layout="single")
    assert plan.job_resources["runtime"](matrix, 1) > fault_minutes
    assert plan.job_resources["runtime"](matrix, 2) == 2 * plan.job_resources["runtime"](matrix, 1)


def test_gpu_job_resources_become_the_right_sbatch_flags():
    plan = _plan(4)
    multi = _sbatch(plan, "fsdp2_8").split()
    assert {"--nodes=2", "--ntasks=2", "--cpus-per-task=4", "--gres=gpu:4"} <= set(multi)
    assert not [f for f in multi if f.startswith(("--ntasks-per-gpu", "--gpus"))], multi
    assert _resources(plan, "fsdp2_8")["mpi"] == "srun"
    assert _resources(plan, "hsdp_2x8")["nodes"] == 4
    one = _sbatch(plan, "fsdp2_4").split()
    assert {"--nodes=1", "--gres=gpu:4", "--cpus-per-task=4"} <= set(one)
    assert "mpi" not in _resources(plan, "fsdp2_4")
    assert not [f for f in one if f.startswith(("--ntasks", "--gpus"))], one
    assert "--gres=gpu:1" in _sbatch(plan, "single").split()


def test_cpu_job_resources_keep_every_rank_on_one_node():
    flags = _sbatch(_plan(0), "fsdp2_8").split()
    assert {"--nodes=1", "--ntasks=1", "--cpus-per-task=8"} <= set(flags)
    assert not [f for f in flags if "gpu" in f or f.startswith("--gres")], flags


def test_layout_that_does_not_split_over_gpu_nodes_is_refused():
    cfg = {"models": ["mlp"], "layouts": {"fsdp2_6": {"framework": "fsdp2", "mesh": [6]},
           "fsdp2_5": {"framework": "fsdp2", "mesh": [5]}}, "run": {"gpus_per_node": 4}}  # fmt: skip
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    message = str(info.value)
    assert "layouts.fsdp2_5.mesh: world size 5 does not split evenly over 2 nodes" in message
    assert "fsdp2_6" not in message  # 3 ranks on each of 2 nodes


def test_srun_command_starts_one_agent_per_node_with_a_c10d_rendezvous(tmp_path):
    alloc = launcher.Allocation("12345", ["gpu-a", "gpu-b"], 4)
    cmd = launcher.srun_command(alloc, 8, ["spec.json"], tmp_path, 1)
    port = launcher.rendezvous_port("12345", 1)
    for flag in ("--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=4",
                 "--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d",
                 f"--rdzv-endpoint=gpu-a:{port}"):  # fmt: skip
        assert flag in cmd, (flag, cmd)
    assert cmd[0] == "srun" and cmd[-3:] == ["-m", "pipeline_lib.job.worker", "spec.json"]
    # Concurrent jobs (nearby ids) and a job's successive launches get different ports.
    ports = {launcher.rendezvous_port(str(j), n) for j in range(12345, 12400) for n in (1, 2)}
    assert len(ports) == 55 * 2 and all(20000 <= p < 30000 for p in ports)
    with pytest.raises(ValueError, match="does not split evenly"):
        launcher.srun_command(alloc, 3, ["spec.json"], tmp_path, 1)


def test_launcher_choice():
    one, two = launcher.Allocation("1", ["a"], 2), launcher.Allocation("1", ["a", "b"], 2)
    assert launcher.choose_launcher(None, {}) == "standalone"
    assert launcher.choose_launcher(one, {}) == "standalone"
    assert launcher.choose_launcher(two, {}) == "srun"
    assert launcher.choose_launcher(one, {launcher.LAUNCHER_ENV: "srun"}) == "srun"
    assert launcher.choose_launcher(two, {launcher.LAUNCHER_ENV: "standalone"}) == "standalone"
    with pytest.raises(ValueError, match="needs a Slurm allocation"):
        launcher.choose_launcher(None, {launcher.LAUNCHER_ENV: "srun"})


def test_agent_failures_from_every_node_name_the_first_real_cause(tmp_path):
    # Node 0's rank 1 was stopped by its agent (SIGTERM) after node 1's rank 5 was SIGKILLed.
    write_json(tmp_path / "node-0.json", {"1": {"exitcode": -15, "timestamp": 5, "message": ""}})
    write_json(tmp_path / "node-1.json", {"5": {"exitcode": -9, "timestamp": 7, "message": ""}})
    failures = launcher.read_agent_failures(tmp_path)
    assert launcher.describe_failure(failures) == ("crash", "rank 5 killed by SIGKILL", "")
    write_json(tmp_path / "node-1.json", {"4": {"exitcode": 1, "timestamp": 3, "message": {
        "message": "Traceback ...\nRuntimeError: boom"}}})  # fmt: skip
    status, cause, detail = launcher.describe_failure(launcher.read_agent_failures(tmp_path))
    assert (status, cause, detail) == ("error", "rank 4 exited with code 1", "RuntimeError: boom")
    # Rank 0 raised on the closed connection in the same second rank 5 was SIGKILLed.
    write_json(tmp_path / "node-0.json", {"0": {"exitcode": 1, "timestamp": 7, "message": {
        "message": "RuntimeError: Connection closed by peer"}}})  # fmt: skip
    write_json(tmp_path / "node-1.json", {"5": {"exitcode": -9, "timestamp": 7, "message": ""}})
    failures = launcher.read_agent_failures(tmp_path)
    assert launcher.describe_failure(failures) == ("crash", "rank 5 killed by SIGKILL", "")
    # An error a second before the kill stays the cause.
    write_json(tmp_path / "node-0.json", {"0": {"exitcode": 1, "timestamp": 6, "message": {
        "message": "RuntimeError: boom"}}})  # fmt: skip
    failures = launcher.read_agent_failures(tmp_path)
    assert launcher.describe_failure(failures) == (
        "error",
        "rank 0 exited with code 1",
        "RuntimeError: boom",
    )
