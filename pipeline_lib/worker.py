"""The per-rank program of a save or load job, started by torchrun (see launcher.py).

Usage: python -m pipeline_lib.worker SPEC.json. Rank 0 writes progress marks (the launcher's
watchdog reads them) and one result file per step (``results/`` layout in cli.py). Everything
a rank does is in step with the other ranks: every collective runs on all ranks in one order.
"""

from __future__ import annotations

import os
import platform
import resource
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.elastic.multiprocessing.errors import record

from pipeline_lib import frameworks, models
from pipeline_lib.atomic import read_json, write_json, write_with
from pipeline_lib.errors import one_line
from pipeline_lib.state import SafeLoadPlanner, compare, describe, entry_kind, flatten, full_value

# The loader's model starts from a different init, so an entry the load misses cannot pass.
LOADER_SEED_OFFSET = 1_000_003


class Incompatible(Exception):
    """This model cannot run under this layout (the cell becomes ``skip``)."""


class Job:
    def __init__(self, spec: dict):
        self.spec = spec
        self.work = Path(spec["work_dir"])
        device_type = spec["run"]["device"]
        if device_type == "auto":
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
        backend = spec["run"]["backend"]
        if backend == "auto":
            backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        # A rank stuck in a collective gives up after the step timeout (the parent kills sooner).
        timeout = timedelta(seconds=spec["run"]["cell_timeout_s"] * 2)
        dist.init_process_group(backend, timeout=timeout)
        self.rank = dist.get_rank()
        layout = spec["layout"]
        self.framework = frameworks.get(layout["framework"])
        self.mesh = init_device_mesh(
            device_type, tuple(layout["mesh"]), mesh_dim_names=tuple(layout["mesh_dims"])
        )
        self.dp_rank, self.dp_size = 0, 1
        for dim in self.framework.data_parallel_dims:
            self.dp_rank = self.dp_rank * self.mesh[dim].size() + self.mesh.get_local_rank(dim)
            self.dp_size *= self.mesh[dim].size()
        self.tp_degree = self.mesh[layout["tp_dim"]].size() if layout["tp_dim"] else 1
        self.model_module = models.get(spec["model"])
        self.env = {
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "backend": backend,
            "device": device_type,
            "hostname": platform.node(),
        }

    # --- progress and results (rank 0 writes) -------------------------------------------
    def progress(self, step: str) -> None:
        if self.rank == 0:
            write_json(self.work / "progress.json", {"step": step, "at": time.time()})

    def write_result(self, name: str, result: dict) -> None:
        if self.rank == 0:
            write_json(self.work / "results" / f"{name}.json", result)

    def inject(self, phase: str, fault: str | None) -> None:
        """Worker faults (pipeline_lib.faults): break this job on purpose at ``phase``."""
        last = dist.get_world_size() - 1
        if fault == f"kill_rank_{phase}" and self.rank == last:
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault == f"hang_{phase}" and self.rank == last:
            time.sleep(10**6)  # the other ranks block in the next collective
        elif fault == f"segfault_{phase}" and self.rank == 0:
            os.kill(os.getpid(), signal.SIGSEGV)

    def peak_rss_mb(self) -> float:
        peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        return round(float(peak), 1)

    # --- model, optimizer, training --------------------------------------------------------
    def build(self, seed: int):
        """(wrapped model, base model, optimizer, names of the parameters)."""
        torch.manual_seed(seed)
        # model_kwargs (benchmarks only) resize a model, e.g. a 1 GB mlp.
        base = self.model_module.build(**self.spec.get("model_kwargs", {}))
        for dim, size in base.tp_dims().items():
            if size % self.tp_degree:
                raise Incompatible(
                    f"TP degree {self.tp_degree} does not divide {self.spec['model']} {dim}={size}"
                )
        param_names = {name for name, _ in base.named_parameters(remove_duplicate=False)}
        base.to(self.device)
        model = self.framework.parallelize(base, self.mesh)
        optimizer = make_optimizer(model, self.spec["train"])
        return model, base, optimizer, param_names

    def train(self, model, base, optimizer, first_step: int, steps: int) -> list[float]:
        """Train ``steps`` steps on the global batches from ``first_step``; the global mean loss
        of each step. Each data-parallel rank takes its slice of the same global batch."""
        cfg = self.spec["train"]
        losses = []
        for step in range(first_step, first_step + steps):
            inputs, targets = base.make_batch(step, cfg["global_batch"], cfg["seed"])
            count = targets.numel()
            x = inputs.tensor_split(self.dp_size)[self.dp_rank].to(self.device)
            y = targets.tensor_split(self.dp_size)[self.dp_rank].to(self.device)
            loss_sum, _ = base.loss_sum(model(x), y)
            # Gradients are averaged over data-parallel ranks: scale so the result is the
            # gradient of the global mean, whatever the slices' sizes.
            (loss_sum * (self.dp_size / count)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            total = loss_sum.detach().reshape(1).float().clone()
            dist.all_reduce(total)
            losses.append(float(total) / (self.tp_degree * count))
        return losses

    def gathered(self, state: dict):
        """(name, whole value) of every entry, in one order on all ranks; value only on rank 0."""
        flat = flatten(state)
        for name in sorted(flat):
            value = full_value(flat[name])
            yield name, value if self.rank == 0 else None


def make_optimizer(model, train: dict):
    params = model.parameters()
    if train["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=train["lr"])
    if train["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=train["lr"])
    return torch.optim.SGD(params, lr=train["lr"], momentum=0.9)


def run_save(job: Job) -> None:
    spec, cfg = job.spec, job.spec["train"]
    timing = {"startup_s": time.time() - spec["launched_at"]}
    t = time.perf_counter()
    job.progress("build")
    model, base, optimizer, param_names = job.build(cfg["seed"])
    timing["build_s"] = time.perf_counter() - t
    job.progress("train")
    t = time.perf_counter()
    train_losses = job.train(model, base, optimizer, 0, cfg["steps"])
    timing["train_s"] = time.perf_counter() - t

    job.progress("reference")
    t = time.perf_counter()
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    reference, entries = {}, {}
    for name, value in job.gathered(state):
        if job.rank == 0:
            reference[name] = value
            dtype, shape = describe(value)
            entries[name] = {"kind": entry_kind(name, param_names), "dtype": dtype, "shape": shape}
    if job.rank == 0:
        write_with(spec["reference"], lambda tmp: torch.save(reference, tmp))
    reference.clear()
    timing["reference_s"] = time.perf_counter() - t

    job.progress("save")
    job.inject("save", spec.get("fault"))
    t = time.perf_counter()
    dcp.save(state, checkpoint_id=spec["checkpoint"])
    timing["save_s"] = time.perf_counter() - t

    job.progress("resume")
    t = time.perf_counter()
    resume_losses = job.train(model, base, optimizer, cfg["steps"], cfg["resume_steps"])
    timing["resume_s"] = time.perf_counter() - t
    job.write_result(
        "save",
        {
            "status": "ok",
            "reason": "",
            "train_losses": train_losses,
            "resume_losses": resume_losses,
            "entries": entries,
            "timing": timing,
            "peak_rss_mb": job.peak_rss_mb(),
            "env": job.env,
        },
    )


def load_one(job: Job, source: dict) -> dict:
    cfg, fault = job.spec["train"], source.get("fault")
    timing = {}
    t = time.perf_counter()
    model, base, optimizer, _ = job.build(cfg["seed"] + LOADER_SEED_OFFSET)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    timing["build_s"] = time.perf_counter() - t

    t = time.perf_counter()
    job.inject("load", fault)
    if fault != "skip_load":
        dcp.load(state, checkpoint_id=source["checkpoint"], planner=SafeLoadPlanner())
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
    timing["load_s"] = time.perf_counter() - t

    t = time.perf_counter()
    reference = (
        torch.load(source["reference"], mmap=True, weights_only=True) if job.rank == 0 else {}
    )
    model_state, optim_state = get_state_dict(model, optimizer)
    entries = {}
    for name, value in job.gathered({"model": model_state, "optim": optim_state}):
        if job.rank != 0:
            continue
        if fault == "drop_loaded_entry" and name == min(reference):
            continue
        if name in reference:
            result = compare(reference[name], value)
            entries[name] = vars(result)
        else:
            entries[name] = {
                "equal": False,
                "max_abs_diff": None,
                "note": "not in the saver's state",
            }
    for name in reference:
        entries.setdefault(
            name, {"equal": False, "max_abs_diff": None, "note": "missing in the loader's state"}
        )
    del reference
    timing["verify_s"] = time.perf_counter() - t

    t = time.perf_counter()
    if fault == "skew_resume_lr":
        for group in optimizer.param_groups:
            group["lr"] *= 2
    resume_losses = job.train(model, base, optimizer, cfg["steps"], cfg["resume_steps"])
    timing["resume_s"] = time.perf_counter() - t
    return {
        "status": "ok",
        "reason": "",
        "entries": entries,
        "resume_losses": resume_losses,
        "timing": timing,
    }


def run_load(job: Job) -> None:
    startup_s = time.time() - job.spec["launched_at"]
    for source in job.spec["sources"]:
        name = source["id"]
        job.progress(f"cell {name}")
        try:
            result = load_one(job, source)
        except Incompatible:
            raise
        except (Exception, CheckpointException) as exc:
            result = {"status": "error", "reason": one_line(exc)}
        result["timing"] = {**result.get("timing", {}), "startup_s": startup_s}
        result.update(peak_rss_mb=job.peak_rss_mb(), env=job.env, created_at=now())
        job.write_result(name, result)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@record
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    spec = read_json(argv[0])
    job = Job(spec)
    try:
        (run_save if spec["kind"] == "save" else run_load)(job)
    except Incompatible as exc:
        job.write_result("job", {"status": "skip", "reason": str(exc)})
    except (Exception, CheckpointException) as exc:
        job.write_result("job", {"status": "error", "reason": one_line(exc)})
        raise
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
