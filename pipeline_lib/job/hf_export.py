"""Format ``hf_export``: the saver's model state exported for Hugging Face and loaded back with
transformers' own ``from_pretrained``, on the save side (docs/config.md, "Checkpointing axes").

The save writes DCP as format ``dcp`` does (the load cells read it); then every rank writes its
part of the model state with DCP's ``HuggingFaceStorageWriter`` (consolidated into
``model-*.safetensors`` with ``model.safetensors.index.json``, the shards under ``sharded/``)
into ``<save dir>/hf_export``, and rank 0 adds the model's ``config.json``. Rank 0 then loads
the folder with ``<architecture>.from_pretrained`` and checks that every tensor equals the
saver's full model state (under pipeline parallelism the union of every stage's, so an
export that drops a stage's keys fails) bit for bit, and that its logits on a fixed batch equal
those of the architecture built fresh with the saver's state: both forwards run in one
process, on the CPU, in the same dtype, with eager attention, on the same values, so any
difference is the export's (the saver's own forward under TP or FSDP may sum in another order,
so it is not the reference). A LoRA model (models._lora) exports its merged model instead
(``run_merged``).
Imports torch; transformers only through models._hf (HF models only).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from pipeline_lib.common.errors import Incompatible, one_line
from pipeline_lib.models import HF_KEY
from pipeline_lib.models._common import step_generator
from pipeline_lib.verify import faults
from pipeline_lib.verify.results import ExportCheck

FOLDER = "hf_export"
PREFIX = "user_model."  # models._user.UserModel's attribute: not in the exported names
LOGITS_STEP = 10**6  # the fixed batch: the step generator of a step no training reaches
LOGITS_BATCH = 2


def refuse_unless_hf(item) -> None:
    """A model that is not an ``hf_models`` entry has no Hugging Face architecture: a skip."""
    if HF_KEY not in item.spec.model_kwargs:
        raise Incompatible(
            f"format hf_export exports Hugging Face models only (hf_models); {item.spec.model} "
            "is not one"
        )


def run(item, t, dtype: torch.dtype) -> ExportCheck:
    """Write the export and check it (every rank; rank 0's verdict on all)."""
    path = Path(item.spec.save_dir) / FOLDER
    if hasattr(t.base.source, "merged_state"):  # a LoRA model: its adapters merged
        return run_merged(item, t, dtype, path)
    state = exported_state(get_model_state_dict(t.model))
    state = faults.drop_last_stage_export(item.spec.fault, state, t.pipeline)
    verdict = [None]
    if error := write_error(state, t.base.user_model.config, path):
        verdict = [ExportCheck(False, error)]
    full = full_state(t)
    if dist.get_rank() == 0 and verdict[0] is None:
        definition = t.base.source.definition
        reason = compare(definition, exported_state(full), path, dtype, item.train["seed"])
        verdict = [ExportCheck(not reason, reason)]
    dist.broadcast_object_list(verdict, src=0)
    return verdict[0]


def run_merged(item, t, dtype: torch.dtype, path: Path) -> ExportCheck:
    """A LoRA model (models._lora): rank 0 merges the adapters into the saver's full model
    state (``merged_state``: peft's ``merge_and_unload``), writes that with DCP's
    HuggingFaceStorageWriter alone (``no_dist``) and checks it as ``compare`` does, the merged
    state as the saver's."""
    full = full_state(t)
    verdict = [None]
    if dist.get_rank() == 0:
        merged = t.base.source.merged_state(exported_state(full), dtype)
        if error := write_error(merged, t.base.source.config, path, no_dist=True):
            verdict = [ExportCheck(False, error)]
        else:
            definition = t.base.source.definition
            reason = compare(definition, merged, path, dtype, item.train["seed"])
            verdict = [ExportCheck(not reason, reason)]
    dist.broadcast_object_list(verdict, src=0)
    return verdict[0]


def full_state(t) -> dict:
    """The saver's full model state on rank 0 (every rank calls). Under pipeline parallelism
    each stage's ranks hold its entries only: rank 0 gets the union of every stage's."""
    if t.pipeline is None:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(t.model, options=options)
    mine = get_model_state_dict(t.model, options=StateDictOptions(full_state_dict=True))
    every_rank = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object({k: v.cpu() for k, v in mine.items()}, every_rank, dst=0)
    return {k: v for part in every_rank or [] for k, v in part.items()}


def exported_state(model_state: dict) -> dict:
    """The model state under the names transformers uses (without the adapter's prefix)."""
    return {name.removeprefix(PREFIX): value for name, value in model_state.items()}


def write_error(state: dict, config, path: Path, no_dist: bool = False) -> str:
    """Write the export (``write``); "" or why it could not be written, e.g. DCP's
    HuggingFaceStorageWriter refuses tensors that share memory (tied embeddings)."""
    try:
        write(state, config, path, no_dist)
    except (Exception, CheckpointException) as exc:  # CheckpointException: a BaseException
        return f"cannot write: {one_line(exc)}"
    return ""


def write(state: dict, config, path: Path, no_dist: bool = False) -> None:
    """DCP's HuggingFaceStorageWriter (consolidated), then config.json (rank 0). ``no_dist``:
    this rank writes alone (DCP's ``no_dist``), the whole state."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    writer = HuggingFaceStorageWriter(str(path), save_distributed=True, enable_consolidation=True)
    dcp.save(state, storage_writer=writer, no_dist=no_dist)
    if no_dist or not dist.is_initialized() or dist.get_rank() == 0:
        config.save_pretrained(str(path))


def compare(definition, full: dict, path: Path, dtype: torch.dtype, seed: int) -> str:
    """Why the export at ``path`` does not load as ``full`` (the saver's full model state), or
    "": every tensor listed in its index, every tensor bit for bit after from_pretrained, then
    the logits on a fixed batch."""
    if reason := _missing_in_export(full, path):
        return reason
    try:
        loaded = definition.model_class.from_pretrained(
            str(path), dtype=dtype, attn_implementation="eager"
        )
    except Exception as exc:
        return f"from_pretrained: {one_line(exc)}"
    if reason := _tensors_differ(full, loaded.state_dict()):
        return reason
    fresh = definition.build().to(dtype)
    fresh.load_state_dict(full)
    ids = torch.randint(
        loaded.config.vocab_size,
        (LOGITS_BATCH, definition.seq_len),
        generator=step_generator(seed, LOGITS_STEP),
    )
    with torch.no_grad():
        want, got = fresh.eval()(input_ids=ids).logits, loaded.eval()(input_ids=ids).logits
    if not torch.equal(want, got):
        diff = (want.float() - got.float()).abs().max().item()
        return f"logits differ from the saver's (max_abs_diff {diff:.3g})"
    return ""


def _missing_in_export(full: dict, path: Path) -> str:
    """The saver's tensors the export's index does not list (from_pretrained initializes such
    a tensor afresh, and says so only in a log line)."""
    index = path / "model.safetensors.index.json"
    if not index.exists():
        return ""
    listed = set(json.loads(index.read_text())["weight_map"])
    missing = sorted(set(full) - listed)
    if missing:
        return f"{len(missing)} tensor(s) missing in the export; first {missing[0]}"
    return ""


def _tensors_differ(full: dict, loaded: dict) -> str:
    missing = sorted(set(full) - set(loaded))
    if missing:
        return f"{len(missing)} tensor(s) missing after from_pretrained; first {missing[0]}"
    for name, value in full.items():
        other = loaded[name]
        if other.dtype != value.dtype or not torch.equal(other.cpu(), value.cpu()):
            return f"tensor {name} differs after from_pretrained ({other.dtype} vs {value.dtype})"
    return ""
