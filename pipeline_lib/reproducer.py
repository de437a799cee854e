"""A standalone reproducer per non-pass cell: ``<out>/<cell id>/repro.py`` and ``README.txt``.

The script imports torch only: the model's source and the layouts' parallelization are inlined,
the save side and the load side run as the cell's jobs ran them (pipeline_lib.worker and
pipeline_lib.checkpoint_io: state-dict options, mode, format, async save, optimizer, dtype, load
init), and it checks what the cell checked (files vs saver, loader vs saver, resume), bit for
bit against the saver's state gathered whole. ``python repro.py`` runs both torchrun commands
and prints ``STATUS: <status>: <reason>``. Pure text generation here (no torch).
"""

from __future__ import annotations

import pprint
import re
import shlex
from pathlib import Path

import pandas as pd

from pipeline_lib import frameworks, models
from pipeline_lib.axes import DEFAULT, Variant
from pipeline_lib.records import AXIS_COLUMNS

PACKAGE = Path(__file__).resolve().parent
# pipeline_lib.training.LOADER_SEED_OFFSET (training.py imports torch; this module must not).
LOADER_SEED_OFFSET = 1_000_003
REPRODUCED = ("fail", "error", "crash", "timeout")

# Each framework's parallelize, as pipeline_lib/frameworks/<name>.py does it.
FRAMEWORK_CODE = {
    "single": "def parallelize(model, mesh):\n    return model\n",
    "ddp": """def parallelize(model, mesh):
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, process_group=mesh.get_group())
""",
    "fsdp1": """def parallelize(model, mesh, strategy_name="{strategy}"):
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    unit_types = {{type(unit) for unit in model.fsdp_units()}}
    device = next(model.parameters()).device
    return FullyShardedDataParallel(
        model,
        sharding_strategy=ShardingStrategy[strategy_name],
        auto_wrap_policy=ModuleWrapPolicy(unit_types) if unit_types else None,
        device_mesh=mesh,
        device_id=device if device.type == "cuda" else torch.device("cpu"),
        use_orig_params=True,
    )
""",
    "fsdp2": """def parallelize(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for unit in model.fsdp_units():
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
""",
    "tp": """def parallelize(model, mesh):
    from torch.distributed.tensor.parallel import parallelize_module

    return parallelize_module(model, mesh, model.tp_plan())
""",
    "fsdp2_tp": """def parallelize(model, mesh):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    parallelize_module(model, mesh["tp"], model.tp_plan())
    for unit in model.fsdp_units():
        fully_shard(unit, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return model
""",
}
FRAMEWORK_CODE["fsdp1_hybrid"] = FRAMEWORK_CODE["fsdp1"].format(strategy="HYBRID_SHARD")
FRAMEWORK_CODE["fsdp1"] = FRAMEWORK_CODE["fsdp1"].format(strategy="FULL_SHARD")
FRAMEWORK_CODE["hsdp"] = FRAMEWORK_CODE["fsdp2"]

_IMPORT = re.compile(r"^(?:import \S+|from \S+ import [^(]+)$")
_OWN_IMPORT = re.compile(r"^from pipeline_lib\.models(?:\.(\w+))? import (.+)$")


def _strip_docstring(source: str) -> tuple[str, str]:
    match = re.match(r'\s*"""(.*?)"""\n', source, flags=re.DOTALL)
    if not match:
        return "", source
    return match.group(1).strip(), source[match.end() :]


def model_source(name: str) -> str:
    """The model module's source with the pipeline_lib models it imports inlined before it:
    their imports merged at the top, ``build`` of a dependency renamed ``<module>_build`` and
    ``module.name`` references made plain names."""
    if models.is_import_path(name):
        module, _, attr = name.partition(":")
        return f"from {module} import {attr} as build, make_inputs  # your own model\n"
    order: list[str] = []

    def visit(module: str) -> None:
        if module in order:
            return
        text = (PACKAGE / "models" / f"{module}.py").read_text()
        for line in text.splitlines():
            own = _OWN_IMPORT.match(line)
            if own:
                deps = [own.group(1)] if own.group(1) else own.group(2).split(", ")
                for dep in deps:
                    visit(dep.strip())
        order.append(module)

    visit(name)
    imports: list[str] = []
    bodies = []
    for module in order:
        doc, body = _strip_docstring((PACKAGE / "models" / f"{module}.py").read_text())
        kept = []
        for line in body.splitlines():
            if _OWN_IMPORT.match(line):
                continue
            if _IMPORT.match(line):
                if line not in imports:
                    imports.append(line)
                continue
            kept.append(line)
        text = "\n".join(kept).strip("\n") + "\n"
        if module != name:
            text = re.sub(r"^def build\(", f"def {module}_build(", text, flags=re.MULTILINE)
        for dep in order:
            text = re.sub(rf"\b{dep}\.build\(", f"{dep}_build(", text)
            text = re.sub(rf"(?<![\w.]){dep}\.(\w+)", r"\1", text)
        header = f"# --- pipeline_lib/models/{module}.py: " + " ".join(doc.split())[:300]
        bodies.append(_wrap_comment(header) + "\n" + text)
    return "\n".join(imports) + "\n\n\n" + "\n\n".join(bodies)


def _wrap_comment(text: str, width: int = 99) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = "#"
        line = f"{line} {word}" if line else word
    return "\n".join([*lines, line])


def optimizers_source() -> str:
    _, body = _strip_docstring((PACKAGE / "optimizers.py").read_text())
    keep = [line for line in body.splitlines() if not _IMPORT.match(line)]
    return "# --- pipeline_lib/optimizers.py\n" + "\n".join(keep).strip("\n") + "\n"


def layout_source(side: str, framework: str) -> str:
    code = FRAMEWORK_CODE[framework].replace("def parallelize(", f"def parallelize_{side}(", 1)
    return f"# --- the {side} layout: pipeline_lib/frameworks/{framework}.py\n{code}"


def row_variant(row: dict) -> Variant:
    """The variant of a matrix row; an axis a row predates (load_mode, load_process) holds its
    default."""
    return Variant(**{a: row.get(a, getattr(DEFAULT, a)) for a in AXIS_COLUMNS})


def cell_id(row: dict) -> str:
    """Path-safe, unique within a matrix: variant, model, layouts (and torch releases when the
    two sides differ)."""
    variant = row_variant(row).id or "default"
    parts = [variant, row["model"], row["save_layout"], row["load_layout"]]
    if row.get("save_torch_version") != row.get("load_torch_version"):
        parts.append(f"{row['save_torch_version']}-{row['load_torch_version']}")
    return re.sub(r"[^A-Za-z0-9_.+=-]+", "_", ".".join(str(p) for p in parts))


def _layout(config: dict, name: str) -> dict:
    layout = config["layouts"][name]
    framework = frameworks.get(layout["framework"])
    world = 1
    for size in layout["mesh"]:
        world *= size
    return {
        "name": name,
        "framework": framework.name,
        "mesh": list(layout["mesh"]),
        "mesh_dims": list(framework.mesh_dims),
        "tp_dim": framework.tp_dim,
        "world_size": world,
        "shards_meta_model": framework.shards_meta_model,
    }


def cell_spec(row: dict, config: dict) -> dict:
    variant = row_variant(row)
    train = {k: v for k, v in config["train"].items() if k != "optimizer"}
    rtol = config["verify"]["resume_rtol"]
    if variant.param_dtype == "bfloat16":
        rtol = config["verify"].get("resume_rtol_bfloat16", rtol)
    return {
        "model": row["model"],
        "save": _layout(config, row["save_layout"]),
        "load": _layout(config, row["load_layout"]),
        "variant": variant.to_dict(),
        "train": train,
        "loader_seed": train["seed"] + LOADER_SEED_OFFSET,
        "resume_rtol": rtol,
        "device": row["device"] if isinstance(row.get("device"), str) else "cpu",
        "status": row["status"],
        "reason": row["reason"],
        "torch": [row.get("save_torch_version"), row.get("load_torch_version")],
    }


def commands(spec: dict) -> list[str]:
    cmds = []
    for side in ("save", "load"):
        world = spec[side]["world_size"]
        cmds.append(
            f"OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node {world} repro.py {side}"
        )
    return cmds


def script(row: dict, config: dict) -> str:
    spec = cell_spec(row, config)
    title = (
        f"{row['model']}: saved under {row['save_layout']} ({spec['save']['framework']}, mesh "
        f"{spec['save']['mesh']}), loaded under {row['load_layout']} ({spec['load']['framework']},"
        f" mesh {spec['load']['mesh']}); {Variant(**spec['variant']).label}"
    )
    parts = [
        TEMPLATE_HEAD.format(
            title=title,
            status=row["status"],
            reason=" ".join(str(row["reason"]).split())[:600],
            commands="\n".join(f"    {c}" for c in commands(spec)),
        ),
        "CELL = " + pprint.pformat(spec, sort_dicts=False, width=99) + "\n",
        model_source(row["model"]),
        optimizers_source(),
        layout_source("save", spec["save"]["framework"]),
        layout_source("load", spec["load"]["framework"]),
        TEMPLATE_BODY,
    ]
    return "\n\n".join(p.strip("\n") + "\n" for p in parts)


def readme(row: dict, config: dict) -> str:
    spec = cell_spec(row, config)
    saver, loader = spec["torch"]
    versions = (
        f"torch {saver}"
        if saver == loader
        else f"save under torch {saver}, load under torch {loader}"
    )
    return (
        f"Reproducer of a dcp-matrix cell ({versions}, device {spec['device']}):\n"
        f"  {row['model']} saved under {row['save_layout']}, loaded under {row['load_layout']},"
        f" {Variant(**spec['variant']).label}\n"
        f"  status {row['status']}: {row['reason']}\n\n"
        "Needs torch only. In a fresh folder (the save writes checkpoint/, reference.pt and\n"
        "saver.json beside the script; the load reads them):\n\n"
        + "\n".join(f"  {c}" for c in commands(spec))
        + "\n\nor both, then the verdict (STATUS: <status>: <reason>):\n\n  python repro.py\n"
    )


def not_modelled(variant: Variant) -> str | None:
    """Why the script cannot replay a variant (it models one mode on both sides, a fresh
    loader and the entry a strict / non_strict saver leaves out), or None."""
    if variant.load_mode != "same":
        return f"load_mode {variant.load_mode} (the script loads in the saver's mode)"
    if variant.adds_entry:
        return f"mode {variant.mode} (the script adds no entry)"
    if variant.load_process != "fresh":
        return f"load_process {variant.load_process} (the script loads in a fresh process)"
    if variant.async_save == "process_pinned":
        return "async_save process_pinned (the script stages with async_save's default)"
    if variant.saves_sequence:
        return f"save_sequence {variant.save_sequence} (the script saves once)"
    return None


def write_all(matrix: pd.DataFrame, config: dict, out: str) -> list[Path]:
    """A reproducer folder per cell whose status is not pass/skip (any earlier one removed);
    none for the cells of an existing checkpoint (its save layout is not a layout: the
    checkpoint folder and the load job's log reproduce it)."""
    import shutil

    root = Path(out)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    written = []
    index = ["# Reproducers", "", "| cell | status | reason |", "|---|---|---|"]
    for row in matrix[matrix.status.isin(REPRODUCED)].to_dict("records"):
        if (
            row["save_layout"] not in config["layouts"]
            or row["load_layout"] not in config["layouts"]
        ):
            continue
        layouts = config["layouts"]
        sides = (layouts[row["save_layout"]]["framework"], layouts[row["load_layout"]]["framework"])
        why = not_modelled(row_variant(row))
        if row["model"] in config.get("hf_models", {}):
            # The script inlines a model module's source; an hf_models entry has none.
            why = "an hf_models model"
        elif missing := [f for f in sides if f not in FRAMEWORK_CODE]:
            why = f"framework {missing[0]} has no torch-only code (FRAMEWORK_CODE)"
        if why:
            index.append(f"| {cell_id(row)} | {row['status']} | not reproduced: {why} |")
            continue
        folder = root / cell_id(row)
        folder.mkdir()
        (folder / "repro.py").write_text(script(row, config))
        (folder / "README.txt").write_text(readme(row, config))
        reason = str(row["reason"]).replace("|", "\\|")[:200]
        index.append(f"| [{folder.name}]({folder.name}/repro.py) | {row['status']} | {reason} |")
        written.append(folder)
    (root / "index.md").write_text("\n".join(index) + "\n")
    return written


def shell_quote(text: str) -> str:
    return shlex.quote(text)


TEMPLATE_HEAD = '''#!/usr/bin/env python3
"""Reproducer (torch only) of a dcp-matrix cell.

{title}
The cell's status: {status}: {reason}

Run in a fresh folder, one rank per process:
{commands}
or `python repro.py`: both commands, then `STATUS: <status>: <reason>`.
"""

import contextlib
import glob
import json
import os
import re
import signal
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
'''

TEMPLATE_BODY = '''
# --- the cell's jobs (pipeline_lib/worker.py, pipeline_lib/checkpoint_io.py) ---------------------
V = CELL["variant"]
FULL_WRITE = V["mode"] == "full" or V["format"] == "torch_save_to_dcp"
FULL_READ = V["mode"] == "full" or V["format"] == "torch_save"
SAFETENSORS = V["format"].startswith("safetensors")
DROPS_ENTRY = V["mode"] in ("strict", "non_strict")
CHECKPOINT, FULL_STATE = "checkpoint", "full_state.pt"
REFERENCE, SAVER = "reference.pt", "saver.json"


class Run:
    def __init__(self, side):
        self.layout = CELL[side]
        self.device = torch.device("cpu")
        backend = "gloo"
        if CELL["device"] == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            self.device, backend = torch.device("cuda", torch.cuda.current_device()), "nccl"
        dist.init_process_group(backend)
        self.rank = dist.get_rank()
        lay = self.layout
        self.mesh = init_device_mesh(
            self.device.type, tuple(lay["mesh"]), mesh_dim_names=tuple(lay["mesh_dims"])
        )
        self.dp_rank, self.dp_size = 0, 1
        for dim in lay["mesh_dims"]:
            if dim != lay["tp_dim"]:
                self.dp_rank = self.dp_rank * self.mesh[dim].size() + self.mesh.get_local_rank(dim)
                self.dp_size *= self.mesh[dim].size()
        self.tp_degree = self.mesh[lay["tp_dim"]].size() if lay["tp_dim"] else 1
        self.parallelize = parallelize_save if side == "save" else parallelize_load

    def build(self, seed, meta=False):
        torch.manual_seed(seed)
        with torch.device("meta") if meta else contextlib.nullcontext():
            base = build()
        self.frozen = any(not p.requires_grad for p in base.parameters())
        base.to(getattr(torch, V["param_dtype"]))
        shards_meta = self.layout["shards_meta_model"]
        if not meta:
            base.to(self.device)
        elif not shards_meta:
            base.to_empty(device=self.device)
        model = self.parallelize(base, self.mesh)
        if meta and shards_meta:
            model.to_empty(device=self.device)
        optimizer, scheduler = make(V["optimizer"], model, CELL["train"]["lr"])
        self.base, self.model, self.optimizer, self.scheduler = base, model, optimizer, scheduler

    def train(self, first, steps):
        cfg, dtype, losses = CELL["train"], getattr(torch, V["param_dtype"]), []
        for step in range(first, first + steps):
            inputs, targets = self.base.make_batch(step, cfg["global_batch"], cfg["seed"])
            count = targets.numel()
            x = inputs.tensor_split(self.dp_size)[self.dp_rank].to(self.device)
            if x.is_floating_point():
                x = x.to(dtype)
            y = targets.tensor_split(self.dp_size)[self.dp_rank].to(self.device)
            loss_sum, _ = self.base.loss_sum(self.model(x).float(), y)
            (loss_sum * (self.dp_size / count)).backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.scheduler is not None:
                self.scheduler.step()
            total = loss_sum.detach().reshape(1).float().clone()
            dist.all_reduce(total)
            losses.append(float(total) / (self.tp_degree * count))
        return losses

    def options(self, full):
        return StateDictOptions(
            full_state_dict=full,
            cpu_offload=full,
            ignore_frozen_params=self.frozen,
            flatten_optimizer_state_dict=V["mode"] == "flattened_optim",
        )

    def state(self, full=False):
        model_state, optim_state = get_state_dict(
            self.model, self.optimizer, options=self.options(full)
        )
        state = {"model": model_state, "optim": optim_state}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler
        return state


def saved(state):
    """What the format holds: safetensors holds tensors only (no param_groups)."""
    if SAFETENSORS:
        return {"model": state["model"], "optim": {"state": state["optim"]["state"]}}
    return state


def plain(state):
    return {k: v if k in ("model", "optim") else v.state_dict() for k, v in state.items()}


def flatten(state, prefix=""):
    flat = {}
    items = state.items() if isinstance(state, dict) else enumerate(state)
    for key, value in items:
        name = f"{prefix}{key}"
        nested = isinstance(value, list) and any(
            isinstance(v, (dict, list, torch.Tensor)) for v in value
        )
        if isinstance(value, dict) or nested:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def whole(flat):
    """Every entry's whole value on this rank (DTensors gathered: a collective per DTensor, in
    name order on every rank)."""
    out = {}
    for name in sorted(flat):
        value = flat[name]
        if isinstance(value, DTensor):
            value = value.full_tensor()
        out[name] = value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value
    return out


def compare(check, got, reference, skip=()):
    """'' or the reason: entries missing, extra, or not bit for bit equal."""
    bad = []
    for name in sorted(set(got) | set(reference)):
        if name in skip:
            continue
        if name not in reference:
            bad.append(f"{name}: not in the saver's state")
        elif name not in got:
            bad.append(f"{name}: missing")
        elif isinstance(reference[name], torch.Tensor) != isinstance(got[name], torch.Tensor):
            bad.append(f"{name}: tensor vs non-tensor")
        elif isinstance(reference[name], torch.Tensor):
            a, b = got[name], reference[name]
            if a.dtype != b.dtype or a.shape != b.shape:
                bad.append(f"{name}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}")
            elif not torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)):
                diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
                bad.append(f"{name}: bytes differ (max_abs_diff {diff:.3g})")
        elif got[name] != reference[name]:
            bad.append(f"{name}: {got[name]!r} != {reference[name]!r}")
    n = len(set(got) | set(reference))
    return f"{check}: {len(bad)} of {n} entries differ; first {bad[0]}" if bad else ""


def read_files():
    """The checkpoint read back in this one process (no process group)."""
    if FULL_READ:
        return flatten(torch.load(FULL_STATE, weights_only=True))
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if SAFETENSORS:
        reader = dcp.HuggingFaceStorageReader(CHECKPOINT)
    else:
        reader = dcp.FileSystemReader(CHECKPOINT)
    meta = reader.read_metadata().state_dict_metadata
    holder = {
        n: torch.empty(m.size, dtype=m.properties.dtype)
        if isinstance(m, TensorStorageMetadata)
        else None
        for n, m in meta.items()
    }
    dcp.load(holder, storage_reader=reader, no_dist=True)
    return holder


def write(state):
    """Returns wait(): waits for an async save."""
    if FULL_WRITE:
        if dist.get_rank() == 0:
            torch.save(plain(state), FULL_STATE)
        dist.barrier()
    elif SAFETENSORS:
        writer = dcp.HuggingFaceStorageWriter(
            CHECKPOINT,
            save_distributed=True,
            enable_consolidation=V["format"] == "safetensors_consolidated",
        )
        dcp.save(state, storage_writer=writer)
    elif V["async_save"] != "sync":
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        group = dist.new_group(backend="gloo")
        pending = dcp.async_save(
            state,
            checkpoint_id=CHECKPOINT,
            process_group=group,
            async_checkpointer_type=AsyncCheckpointerType[V["async_save"].upper()],
        )
        future = getattr(pending, "upload_completion", pending)
        return future.result
    else:
        dcp.save(state, checkpoint_id=CHECKPOINT)
    return lambda: None


def convert():
    """Rank 0, no process group: the format's offline conversion."""
    if V["format"] not in ("torch_save", "torch_save_to_dcp"):
        return
    from torch.distributed.checkpoint import format_utils

    if V["format"] == "torch_save":
        format_utils.dcp_to_torch_save(CHECKPOINT, FULL_STATE)
    else:
        format_utils.torch_save_to_dcp(FULL_STATE, CHECKPOINT)


def run_save():
    run = Run("save")
    cfg = CELL["train"]
    run.build(cfg["seed"])
    run.train(0, cfg["steps"])
    state = saved(run.state(full=FULL_WRITE))
    dropped = []
    if DROPS_ENTRY:
        key = min(state["model"])
        del state["model"][key]
        dropped = [f"model.{key}"]
    reference = whole(flatten(plain(state)))
    wait = write(state)
    resume = run.train(cfg["steps"], cfg["resume_steps"])
    wait()
    dist.barrier()
    if run.rank == 0:
        torch.save(reference, REFERENCE)
        convert()
        reason = compare("files vs saver", read_files(), reference)
        with open(SAVER, "w") as f:
            json.dump({"resume_losses": resume, "dropped": dropped, "files": reason}, f)
    dist.barrier()
    dist.destroy_process_group()


def read(run, state):
    """dcp.load + set_state_dict as the cell's load; the model entries reported missing."""
    from dataclasses import replace

    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
        set_state_dict,
    )

    opts = run.options(full=False)
    strict = V["mode"] != "non_strict"
    if FULL_READ:
        full = torch.load(FULL_STATE, weights_only=True) if run.rank == 0 else {}
        broadcast = replace(opts, full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(run.model, full.get("model", {}), options=broadcast)
        set_optimizer_state_dict(run.model, run.optimizer, full.get("optim", {}), options=broadcast)
        if "scheduler" in state:
            value = [full.get("scheduler")]
            dist.broadcast_object_list(value, src=0)
            state["scheduler"].load_state_dict(value[0])
        return []
    reader = dcp.HuggingFaceStorageReader(CHECKPOINT) if SAFETENSORS else None
    if not strict:
        meta = (reader or dcp.FileSystemReader(CHECKPOINT)).read_metadata()
        present = set(meta.state_dict_metadata)
        for key in [k for k in state["model"] if f"model.{k}" not in present]:
            del state["model"][key]
    if SAFETENSORS:
        dcp.load(saved(state), storage_reader=reader)
    else:
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

        planner = DefaultLoadPlanner(allow_partial_load=not strict)
        dcp.load(state, checkpoint_id=CHECKPOINT, planner=planner)
    result = set_state_dict(
        run.model,
        run.optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=replace(opts, strict=strict and not opts.ignore_frozen_params),
    )
    return [] if strict else sorted(f"model.{k}" for k in result.missing_keys)


def run_load():
    run = Run("load")
    cfg = CELL["train"]
    with open(SAVER) as f:
        saver = json.load(f)
    run.build(CELL["loader_seed"], meta=V["load_init"] == "meta")
    state = run.state()
    reasons = [saver["files"]]
    try:
        missing = read(run, state)
    except BaseException as exc:  # CheckpointException derives from BaseException
        if V["mode"] != "strict":
            raise
        if saver["dropped"][0] not in str(exc):
            reasons.append(f"strict load: failed without naming {saver['dropped'][0]}: {exc}")
        return finish(run, reasons)
    if V["mode"] == "strict":
        reasons.append(f"strict load: a checkpoint without {saver['dropped'][0]} loaded")
        return finish(run, reasons)
    got = whole(flatten(plain(saved(run.state()))))
    reference = torch.load(REFERENCE, weights_only=True)
    every = [None] * dist.get_world_size() if run.rank == 0 else None
    dist.gather_object(compare("loader vs saver", got, reference, skip=set(missing)), every)
    reasons += every or []
    losses = run.train(cfg["steps"], cfg["resume_steps"])
    if V["mode"] == "non_strict":
        if sorted(missing) != sorted(saver["dropped"]):
            reasons.append(
                f"non-strict load: reported missing {missing}, the saver left out "
                f"{saver['dropped']}"
            )
    else:
        ref = saver["resume_losses"]
        rel = [abs(a - b) / max(abs(b), 1e-30) for a, b in zip(losses, ref)]
        worst = max(rel) if rel else 0.0
        if not worst <= CELL["resume_rtol"]:
            reasons.append(
                f"resume: loss differs by {worst:.3g} (relative), above {CELL['resume_rtol']:g}"
            )
    return finish(run, reasons)


def finish(run, reasons):
    if run.rank == 0:
        reasons = list(dict.fromkeys(r for r in reasons if r))
        verdict = ("fail", "; ".join(reasons)) if reasons else ("pass", "")
        with open("loader.json", "w") as f:
            json.dump(verdict, f)
    dist.barrier()
    dist.destroy_process_group()


def rank_main(side):
    try:
        run_save() if side == "save" else run_load()
    except BaseException as exc:
        text = one_line(exc)
        with open(f"error-{side}-rank{os.environ.get('RANK', 0)}.txt", "w") as f:
            f.write(text)
        raise


def one_line(exc):
    """Type and first line; a CheckpointException names its ranks and its first cause."""
    failures = getattr(exc, "failures", None)
    if type(exc).__name__ == "CheckpointException" and failures:
        rank = min(failures)
        return f"CheckpointException on rank(s) {sorted(failures)}: {one_line(failures[rank][0])}"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def launch(side):
    """One torchrun launch; None, or the status and reason of a job that did not finish."""
    for stale in glob.glob(f"error-{side}-rank*.txt"):
        os.remove(stale)
    world = CELL[side]["world_size"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={world}", os.path.abspath(__file__), side]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
    if proc.returncode == 0:
        return None
    # A rank killed by a signal first: the other ranks then fail in their collectives.
    # torchrun's summary: "rank : R ... exitcode : -S"; the agent's SIGTERM to the others
    # comes after the first death.
    deaths = re.findall(r"rank\\s*:\\s*(\\d+)[^\\n]*\\n\\s*exitcode\\s*:\\s*-(\\d+)",
                        proc.stdout + proc.stderr)  # fmt: skip
    deaths = [(r, signal.Signals(int(n)).name) for r, n in deaths]
    deaths.sort(key=lambda d: d[1] == "SIGTERM")
    if deaths:
        return "crash", f"{side}: rank {deaths[0][0]} killed by {deaths[0][1]}"
    errors = sorted(glob.glob(f"error-{side}-rank*.txt"))
    if errors:
        with open(errors[0]) as f:
            return "error", f"{side}: {f.read()}"
    return "error", f"{side}: torchrun exited with code {proc.returncode}"


def driver():
    outcome = launch("save") or launch("load")
    if outcome is None:
        with open("loader.json") as f:
            outcome = tuple(json.load(f))
    status, reason = outcome
    print(f"STATUS: {status}: {reason}")
    print(f"(the cell's status: {CELL['status']})")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        rank_main(sys.argv[1])
    else:
        driver()
'''
