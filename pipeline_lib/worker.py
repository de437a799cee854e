"""The per-rank program of a save or load job, started by torchrun (see launcher.py).

Usage: python -m pipeline_lib.worker SPEC.json. The process group and device mesh are made once;
then the job's items (variant, model) run one after the other. Rank 0 writes progress marks
(the launcher's watchdog reads them; ``unit`` names the save item or load cell in progress) and
one result file per unit (``results/<unit>.json``, read by cli.py). Everything a rank does is in
step with the other ranks: every collective runs on all ranks in one order.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.elastic.multiprocessing.errors import record

from pipeline_lib import checkpoint_io, frameworks, models, optimizers
from pipeline_lib.atomic import read_json, write_json
from pipeline_lib.axes import Variant
from pipeline_lib.errors import Incompatible, one_line
from pipeline_lib.faults import FAULTS
from pipeline_lib.live import Anatomy, live_state
from pipeline_lib.state import (
    EntryComparison,
    Reference,
    checkpoint_entries,
    describe,
    entry_kind,
    file_entries,
    flatten,
    merge,
    shared_storage,
    unmatched,
)

# The loader's model starts from a different init, so an entry the load misses cannot pass.
LOADER_SEED_OFFSET = 1_000_003


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
        self.env = {
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "backend": backend,
            "device": device_type,
            "hostname": platform.node(),
            "threads_per_rank": torch.get_num_threads(),
        }

    # --- progress and results (rank 0 writes) -------------------------------------------
    def progress(self, step: str, unit: str) -> None:
        if self.rank == 0:
            write_json(self.work / "progress.json", {"step": step, "unit": unit, "at": time.time()})

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
    def build(self, item: Item, seed: int, meta: bool = False, fault: str | None = None) -> Trainee:
        """The item's model, of its variant's dtype, under the layout, its optimizer and
        scheduler. ``meta``: built on the meta device and materialized empty (no values until a
        load)."""
        torch.manual_seed(seed)
        # model_kwargs (benchmarks only) resize a model, e.g. a 1 GB mlp.
        with torch.device("meta") if meta else contextlib.nullcontext():
            base = item.model_module.build(**item.spec.get("model_kwargs", {}))
        for dim, size in base.tp_dims().items():
            if size % self.tp_degree:
                raise Incompatible(
                    f"TP degree {self.tp_degree} does not divide {item.spec['model']} {dim}={size}"
                )
        anatomy = Anatomy.of(base)
        base.to(getattr(torch, item.variant.param_dtype))
        if not meta:
            base.to(self.device)
        elif not self.framework.shards_meta_model:
            base.to_empty(device=self.device)
        model = self.framework.parallelize(base, self.mesh)
        if meta and self.framework.shards_meta_model:
            model.to_empty(device=self.device)
        optimizer, scheduler = optimizers.make(item.variant.optimizer, model, item.train["lr"])
        trainee = Trainee(model, base, optimizer, scheduler, anatomy)
        if fault == "stale_param":  # the state right after the build, for the fault to return
            model_state, _ = get_state_dict(model, optimizer)
            trainee.at_build = {name: value.clone() for name, value in model_state.items()}
        return trainee

    def train(self, item: Item, t: Trainee, first_step: int, steps: int) -> list[float]:
        """Train ``steps`` steps on the global batches from ``first_step``; the global mean loss
        of each step. Each data-parallel rank takes its slice of the same global batch."""
        cfg = item.train
        dtype = getattr(torch, item.variant.param_dtype)
        losses = []
        for step in range(first_step, first_step + steps):
            inputs, targets = t.base.make_batch(step, cfg["global_batch"], cfg["seed"])
            count = targets.numel()
            x = inputs.tensor_split(self.dp_size)[self.dp_rank].to(self.device)
            if x.is_floating_point():
                x = x.to(dtype)
            y = targets.tensor_split(self.dp_size)[self.dp_rank].to(self.device)
            # The loss in float32 whatever the parameters' dtype.
            loss_sum, _ = t.base.loss_sum(t.model(x).float(), y)
            # Gradients are averaged over data-parallel ranks: scale so the result is the
            # gradient of the global mean, whatever the slices' sizes.
            (loss_sum * (self.dp_size / count)).backward()
            t.optimizer.step()
            t.optimizer.zero_grad(set_to_none=True)
            if t.scheduler is not None:
                t.scheduler.step()
            total = loss_sum.detach().reshape(1).float().clone()
            dist.all_reduce(total)
            losses.append(float(total) / (self.tp_degree * count))
        return losses

    def state(self, item: Item, t: Trainee, full: bool = False, fault: str | None = None) -> dict:
        """The state a checkpoint holds: model, optimizer and (Stateful) LR scheduler, as
        get_state_dict gives it (and a state fault corrupts it, on both sides)."""
        opts = checkpoint_io.options(item.variant, bool(t.frozen), full)
        model_state, optim_state = get_state_dict(t.model, t.optimizer, options=opts)
        if fault in FAULTS and FAULTS[fault].stage == "state":
            FAULTS[fault].corrupt(model_state, optim_state, t.at_build)
        state = {"model": model_state, "optim": optim_state}
        if t.scheduler is not None:
            state["scheduler"] = t.scheduler
        return state

    def live(self, item: Item, t: Trainee, dropped: list[str] = ()) -> dict:
        """This rank's live state (pipeline_lib.live: read from the model and optimizer, not
        through the state-dict API), named and filtered as the variant's checkpoint holds it;
        ``dropped``: entries the saver leaves out on purpose."""
        starts = self.framework.flat_starts(t.model) if self.framework.flat_starts else {}
        flat = live_state(
            t.model,
            t.optimizer,
            t.scheduler,
            t.anatomy,
            starts,
            ignore_frozen=bool(t.frozen),
            flattened_optim=item.variant.mode == "flattened_optim",
        )
        flat = checkpoint_io.saved_entries(item.variant, flat)
        return {n: v for n, v in flat.items() if not any(_within(n, d) for d in dropped)}

    def compare(
        self,
        flat: dict,
        reference_path: str,
        side: str,
        anatomy: Anatomy,
        skip=(),
        drop_first=False,
        shared: dict[str, str] | None = None,
    ) -> dict:
        """Every rank compares its part of every entry of ``flat`` (a state of ``side``: "the
        saver's state dict", "the loader's state", ...) with the saver's reference, one entry
        at a time, no collective per entry; entries sharing storage the model does not tie
        fail too. Rank 0 gets the merged comparison of each entry ({} on the other ranks).
        ``skip``: entries not to compare; ``drop_first`` (fault drop_loaded_entry): leave out
        the first on purpose; ``shared``: more entries that share storage (name -> note)."""
        reference = Reference(reference_path)
        names = sorted(set(flat) - set(skip) - ({min(reference)} if drop_first else set()))
        mine = {name: reference.compare(name, flat[name]) for name in names if name in reference}
        shared = {
            **(shared or {}),
            **shared_storage({n: flat[n] for n in names}, anatomy.canonical),
        }
        for name, note in shared.items():
            found = mine.get(name, EntryComparison(True, None))
            detail = "" if found.equal else f"; {found.note}"
            mine[name] = EntryComparison(False, found.max_abs_diff, note + detail)
        extra = [name for name in names if name not in reference]
        every_rank = [None] * dist.get_world_size() if self.rank == 0 else None
        dist.gather_object((mine, extra), every_rank, dst=0)
        if self.rank != 0:
            return {}
        entries = {
            name: vars(merge([part[name] for part, _ in every_rank if name in part]))
            for name in sorted(set().union(*(part for part, _ in every_rank)))
        }
        for name in sorted(set().union(*(names for _, names in every_rank))):
            entries.setdefault(name, unmatched("not in the saver's state"))
        for name in reference:
            entries.setdefault(name, unmatched(f"missing in {side}"))
        return entries

    def files_check(self, item: Item) -> tuple[dict, str]:
        """Files vs saver: read back what the load jobs will read, every rank a share of the
        entries in a process-group-free reader (as a process without the saving ranks reads
        it), and compare each bit for bit with the saver's reference. Rank 0 gets the entries'
        comparisons, or a reason the checkpoint cannot be read ({} and "" on other ranks)."""
        spec, variant = item.spec, item.variant
        reference = Reference(spec["reference"])
        path = spec["full_state"] if variant.reads_full_state else spec["checkpoint"]
        share = (self.rank, dist.get_world_size())
        entries, error = {}, ""
        try:
            if variant.reads_full_state:
                read = file_entries(path, share)
            else:
                read = checkpoint_entries(path, variant.format.startswith("safetensors"), share)
            for name, value in read:
                if isinstance(value, BaseException):
                    entries[name] = unmatched(f"unreadable: {one_line(value)}")
                elif name not in reference:
                    entries[name] = unmatched("not in the saver's state")
                else:
                    entries[name] = vars(reference.compare(name, value))
        except (Exception, CheckpointException) as exc:
            error = f"files vs saver: cannot read checkpoint {path}: {one_line(exc)}"
        every_rank = [None] * dist.get_world_size() if self.rank == 0 else None
        dist.gather_object((entries, error), every_rank, dst=0)
        if self.rank != 0:
            return {}, ""
        errors = [e for _, e in every_rank if e]
        if errors:
            return {}, errors[0]
        entries = {name: c for part, _ in every_rank for name, c in part.items()}
        for name in reference:
            entries.setdefault(name, unmatched("missing in the checkpoint"))
        return entries, ""

    def finish_files(self, item: Item) -> dict:
        """Rank 0, once the checkpoint is written: the offline conversion of the variant's
        format and the item's checkpoint fault, before any check reads the files. Every rank
        gets rank 0's account: ``convert_s``, ``fault_applied`` or an ``error``."""
        account = {}
        fault = FAULTS.get(item.spec.get("fault"))
        if self.rank == 0:
            t = time.perf_counter()
            try:
                checkpoint_io.convert(item.variant, item.spec)
                account["convert_s"] = time.perf_counter() - t
            except Exception as exc:
                account["error"] = f"conversion: {one_line(exc)}"
            if fault and fault.stage == "checkpoint" and "error" not in account:
                try:
                    account["fault_applied"] = fault.apply(Path(item.spec["checkpoint"]))
                except Exception as exc:  # the other ranks wait in the broadcast below
                    account["error"] = f"checkpoint fault {fault.name}: {one_line(exc)}"
        shared = [account]
        dist.broadcast_object_list(shared, src=0)
        return shared[0]


class Item:
    """One (variant, model) of a job, from its spec (grid.save_spec or grid.load_spec)."""

    def __init__(self, spec: dict):
        self.spec, self.id, self.train = spec, spec["id"], spec["train"]
        self.model_module = models.get(spec["model"])
        self.variant = Variant(**spec["variant"])


@dataclass
class Trainee:
    model: torch.nn.Module  # wrapped by the layout's framework
    base: torch.nn.Module  # the model module's own object (make_batch, loss_sum)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    anatomy: Anatomy  # the model's state entries, from the unwrapped module
    at_build: dict = field(default_factory=dict)  # fault stale_param: the state at build

    @property
    def param_names(self) -> set[str]:
        return set(self.anatomy.shapes)

    @property
    def frozen(self) -> frozenset[str]:
        """Frozen parameters (saved and loaded with ignore_frozen_params)."""
        return self.anatomy.frozen


def run_save(job: Job, item: Item, startup_s: float) -> None:
    spec, cfg, variant, fault = item.spec, item.train, item.variant, item.spec.get("fault")
    timing = {"startup_s": startup_s}
    t = time.perf_counter()
    job.progress("build", item.id)
    trainee = job.build(item, cfg["seed"], fault=fault)
    timing["build_s"] = time.perf_counter() - t
    job.progress("train", item.id)
    t = time.perf_counter()
    train_losses = job.train(item, trainee, 0, cfg["steps"])
    timing["train_s"] = time.perf_counter() - t

    job.progress("reference", item.id)
    t = time.perf_counter()
    dropped = [f"model.{trainee.anatomy.first_entry(bool(trainee.frozen))}"]
    dropped = dropped if variant.drops_entry else []
    # The saver's reference: its live objects, read before the state-dict API runs (so that
    # nothing it does to them reaches the reference); every rank writes its own parts.
    live = job.live(item, trainee, dropped)
    Reference.write(spec["reference"], live, job.rank)
    # Entries of the live state itself that share storage (a model or optimizer bug).
    live_shared = {
        name: f"live: {note}"
        for name, note in shared_storage(live, trainee.anatomy.canonical).items()
    }
    del live
    timing["reference_s"] = time.perf_counter() - t

    job.progress("state dict", item.id)
    t = time.perf_counter()
    state = job.state(item, trainee, full=variant.writes_full_state, fault=fault)
    state = checkpoint_io.saved(variant, state)
    for name in dropped:
        del state["model"][name.removeprefix("model.")]
    flat = flatten(checkpoint_io.plain(state))
    dist.barrier()  # every rank's part of the reference is written
    state_check = job.compare(
        flat, spec["reference"], "the saver's state dict", trainee.anatomy, shared=live_shared
    )
    entries = {}
    for name, value in flat.items() if job.rank == 0 else ():
        dtype, shape = describe(value)
        kind = entry_kind(name, trainee.param_names)
        entries[name] = {"kind": kind, "dtype": dtype, "shape": shape}
    timing["state_check_s"] = time.perf_counter() - t

    job.progress("save", item.id)
    job.inject("save", fault)
    wait = checkpoint_io.write(variant, state, spec, timing)

    job.progress("resume", item.id)
    t = time.perf_counter()
    # An async save is still writing while the training loop goes on.
    resume_losses = job.train(item, trainee, cfg["steps"], cfg["resume_steps"])
    timing["resume_s"] = time.perf_counter() - t
    wait()

    job.progress("files check", item.id)
    files = job.finish_files(item)
    if "error" in files:
        job.write_result(item.id, {"status": "error", "reason": files["error"]})
        return
    t = time.perf_counter()
    files_check, files_error = job.files_check(item)
    timing.update(files_check_s=time.perf_counter() - t, convert_s=files.get("convert_s", 0.0))
    job.write_result(
        item.id,
        {
            "status": "ok",
            "reason": "",
            "state_check": state_check,
            "files_check": files_check,
            "files_error": files_error,
            **({"fault_applied": files["fault_applied"]} if "fault_applied" in files else {}),
            "train_losses": train_losses,
            "resume_losses": resume_losses,
            "entries": entries,
            "dropped_entries": dropped,
            # ignore_frozen_params: none of these may be in the state the saver wrote.
            "frozen_saved": sorted(
                name for name in entries if name.removeprefix("model.") in trainee.frozen
            ),
            "timing": timing,
            "peak_rss_mb": job.peak_rss_mb(),
            "env": job.env,
        },
    )


def load_one(job: Job, item: Item, source: dict) -> dict:
    cfg, fault, variant = item.train, source.get("fault"), item.variant
    timing = {}
    t = time.perf_counter()
    seed = cfg["seed"] + LOADER_SEED_OFFSET
    trainee = job.build(item, seed, meta=variant.load_init == "meta", fault=fault)
    state = job.state(item, trainee, fault=fault)
    timing["build_s"] = time.perf_counter() - t

    t = time.perf_counter()
    job.inject("load", fault)
    opts = checkpoint_io.options(variant, bool(trainee.frozen), full=False)
    missing, strict_error = [], None
    if fault != "skip_load":
        strict = variant.mode != "non_strict"
        try:
            missing = checkpoint_io.read(
                variant, trainee.model, trainee.optimizer, state, source, opts, strict
            )
        except CheckpointException as exc:
            if variant.mode != "strict":
                raise
            # The expected outcome of a strict load of a checkpoint with an entry left out.
            strict_error = one_line(exc)
    timing["load_s"] = time.perf_counter() - t
    if strict_error is not None:
        return {"status": "ok", "reason": "", "strict_error": strict_error, "timing": timing}

    t = time.perf_counter()
    entries = loader_check(job, item, trainee, source, missing, fault)
    timing["verify_s"] = time.perf_counter() - t

    t = time.perf_counter()
    if fault == "skew_resume_lr":
        for group in trainee.optimizer.param_groups:
            group["lr"] *= 2
    resume_losses = job.train(item, trainee, cfg["steps"], cfg["resume_steps"])
    timing["resume_s"] = time.perf_counter() - t
    return {
        "status": "ok",
        "reason": "",
        "entries": entries,
        "missing_entries": missing,
        "resume_losses": resume_losses,
        "timing": timing,
    }


def loader_check(job: Job, item: Item, t: Trainee, source: dict, missing, fault) -> dict:
    """Loader vs saver, twice: the loader's state as get_state_dict gives it, and its live
    objects (pipeline_lib.live), each against the saver's reference. An entry is equal only if
    both are; a difference only the live objects show is noted ``live: ...``."""
    variant, anatomy = item.variant, t.anatomy
    state = checkpoint_io.saved(variant, job.state(item, t, fault=fault))
    through_api = job.compare(
        flatten(checkpoint_io.plain(state)),
        source["reference"],
        "the loader's state",
        anatomy,
        # Reported missing by the non-strict load (and checked against the saver's account).
        skip=set(missing),
        drop_first=fault == "drop_loaded_entry",
    )
    live = job.compare(
        job.live(item, t), source["reference"], "the loader's live state", anatomy, set(missing)
    )
    for name, found in live.items():
        if not found["equal"] and through_api.get(name, {"equal": True})["equal"]:
            through_api[name] = {**found, "note": f"live: {found['note']}"}
    return through_api


def run_load(job: Job, item: Item, startup_s: float) -> None:
    for source in item.spec["sources"]:
        unit = f"{item.id}.{source['id']}"
        job.progress(f"cell {source['id']}", unit)
        try:
            result = load_one(job, item, source)
        except Incompatible:
            raise
        except (Exception, CheckpointException) as exc:
            result = {"status": "error", "reason": one_line(exc)}
        result["timing"] = {**result.get("timing", {}), "startup_s": startup_s}
        result.update(peak_rss_mb=job.peak_rss_mb(), env=job.env, created_at=now())
        job.write_result(unit, result)


def run_item(job: Job, item: Item, startup_s: float) -> None:
    """One item; a model the layout cannot hold makes every unit of the item ``skip``."""
    try:
        (run_save if job.spec["kind"] == "save" else run_load)(job, item, startup_s)
    except Incompatible as exc:
        units = [item.id]
        if job.spec["kind"] == "load":
            units = [f"{item.id}.{source['id']}" for source in item.spec["sources"]]
        for unit in units:
            job.write_result(unit, {"status": "skip", "reason": str(exc)})


def _within(entry: str, key: str) -> bool:
    """An entry is the state dict key ``key`` or one of its flattened parts."""
    return entry == key or entry.startswith(key + ".")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@record
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    spec = read_json(argv[0])
    job = Job(spec)
    startup_s = time.time() - spec["launched_at"]
    try:
        for item in spec["items"]:
            run_item(job, Item(item), startup_s)
    except (Exception, CheckpointException) as exc:
        job.write_result("job", {"status": "error", "reason": one_line(exc)})
        raise
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
