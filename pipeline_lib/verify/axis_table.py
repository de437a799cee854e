"""Each checkpointing axis declared once: its name, its values (the default first), its line
in the docs and the config key it had before every axis was named by one rule.

The rule: an axis's name is its config key (a list of its values), its Parquet column and
the word in a variant's id (``mode-full``). Derived from this table: the fields and defaults
of pipeline_lib.plan.axes.Variant, the config keys (and the one-line error an old key gets,
pipeline_lib.plan.config), the columns of matrix.parquet and tensors.parquet
(records.AXIS_COLUMNS), the enums of workflow/schemas/config.schema.yaml and the table in
docs/config.md (``python -m pipeline_lib axes-table``); tests/test_axis_table.py checks that the
schema and the docs agree with it. Pure data. It lives in verify/ because records (verify/)
names the columns, and plan/ builds on verify/, never the other way."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Axis:
    name: str
    values: tuple[str, ...]
    doc: str  # one line: the docs' table and the config schema's description
    old_key: str | None = None  # its config key before the rule (refused, naming ``name``)
    # False: where a grid gives the axis its default alone, pairwise covering arrays leave it
    # out and give every row the default. An axis at one value adds no pair to cover, but
    # covertable's rows depend on every axis it is given (it orders the pairs by position): an
    # axis declared after the shipped pairwise grids were measured keeps their rows so.
    in_covering_at_default: bool = True

    @property
    def default(self) -> str:
        return self.values[0]


AXIS_TABLE: tuple[Axis, ...] = (
    # sharded: DCP of get_state_dict; full: full state dict written by rank 0 with torch.save
    # and loaded with broadcast_from_rank0; flattened_optim: flatten_optimizer_state_dict=True;
    # strict / non_strict: the saver leaves one model entry out on purpose, a strict load must
    # fail naming it, a non-strict one must report exactly it as missing;
    # strict_unexpected / non_strict_unexpected: the saver adds one model entry the model lacks
    # (UNEXPECTED_ENTRY), a strict load must fail naming it, a non-strict one must report
    # exactly it as unexpected;
    # legacy: FSDP1's own API, as accelerate writes: FSDP.state_dict_type(SHARDED_STATE_DICT),
    # model.state_dict() and FSDP.optim_state_dict, saved with dcp.save (FSDP1 layouts only;
    # load_mode sharded loads it through get_state_dict / set_state_dict);
    # full_dcp: get_state_dict(full_state_dict=True) on every rank, saved with dcp.save;
    # full_dcp_rank0: the same with cpu_offload (rank 0 alone holds it); both load sharded.
    Axis(
        "mode",
        (
            "sharded",
            "full",
            "flattened_optim",
            "strict",
            "non_strict",
            "strict_unexpected",
            "non_strict_unexpected",
            "legacy",
            "full_dcp",
            "full_dcp_rank0",
        ),
        "the state-dict mode of the save (and of the load, unless load_mode says otherwise), "
        "or an entry left out or added on purpose",
        old_key="modes",
    ),
    # same: the mode's own, both sides alike; another: the saver writes what its mode writes,
    # the loader loads it in this mode (docs/config.md, "Save mode != load mode").
    Axis(
        "load_mode",
        ("same", "sharded", "full", "flattened_optim", "legacy"),
        "the loader's state-dict mode: the mode's own, or another one",
        old_key="load_modes",
    ),
    # dcp: FileSystemWriter; safetensors(_consolidated): HuggingFaceStorageWriter (sharded
    # files, and also one consolidated file); torch_save: DCP converted with dcp_to_torch_save
    # and loaded in a single-process layout; torch_save_to_dcp: a torch.save full state dict
    # converted with torch_save_to_dcp and loaded under any layout; hf_export: dcp, plus the
    # model state exported for Hugging Face and loaded back with from_pretrained on the save
    # side (pipeline_lib.job.hf_export; hf_models only).
    Axis(
        "format",
        (
            "dcp",
            "safetensors",
            "safetensors_consolidated",
            "torch_save",
            "torch_save_to_dcp",
            "hf_export",
        ),
        "the checkpoint's files: DCP, safetensors, a torch.save file converted either way, or "
        "DCP plus a Hugging Face export",
        old_key="formats",
    ),
    # sync: dcp.save; thread / process: dcp.async_save with that checkpointer type;
    # process_pinned: the process checkpointer staging into pinned (and shared) memory with
    # DCP's DefaultStager (CUDA only: a skip on a CPU-only job).
    Axis(
        "async_save",
        ("sync", "thread", "process", "process_pinned"),
        "dcp.save, or dcp.async_save with a checkpointer type (training goes on while it writes)",
    ),
    # pipeline_lib.job.optimizers
    Axis(
        "optimizer",
        ("adam", "adamw", "sgd", "adamw_param_groups", "adam_lr_warmup", "sgd_plain"),
        "the optimizer recipe the saver trains with and the loader resumes with",
        old_key="train.optimizer",
    ),
    Axis(
        "param_dtype",
        ("float32", "bfloat16"),
        "the parameters' (and the optimizer state's) dtype",
        old_key="dtypes",
    ),
    # device: the loading model is built with its values; meta: built on the meta device and
    # materialized empty (to_empty), so only the load can give it values.
    Axis(
        "load_init",
        ("device", "meta"),
        "how the loading model is built: with values, or on the meta device and materialized empty",
    ),
    # fresh: the load job's own process builds the loader; saver: the saver's process loads the
    # checkpoint right after its save into its own model and optimizer (trained on since), as a
    # trainer resumes after an evaluation; the cell (save layout = load layout) reads its result.
    Axis(
        "load_process",
        ("fresh", "saver"),
        "which process loads: the load job's own, or the saver's right after its save",
    ),
    # once: one save; load_last / load_first: the saver saves twice with one checkpointer
    # object, at steps train.steps and train.steps + train.resume_steps, into separate folders;
    # the cells load the last checkpoint of the sequence or the first
    # (pipeline_lib.job.sequence_steps).
    Axis(
        "save_sequence",
        ("once", "load_last", "load_first"),
        "one save, or two with one checkpointer object whose cells load the last or the first",
        old_key="save_sequences",
    ),
    # A model's frozen parameters (requires_grad False: a LoRA model's base): ignored, left
    # out of the state saved and loaded (torch's ignore_frozen_params; for a LoRA model, the
    # adapter-only checkpoint), or saved with the rest (the full state). A model without frozen
    # parameters has one state: its cells of frozen_params saved are skip.
    Axis(
        "frozen_params",
        ("ignored", "saved"),
        "a model's frozen parameters left out of the state saved and loaded, or saved with it",
    ),
    # pipeline_lib.job.histories: plain: every parameter trains to the save; frozen_midway: the
    # first module's parameters train for half of train.steps, then are frozen and stay in the
    # optimizer; group_added_midway: they are frozen and out of the optimizer at the start, then
    # unfrozen and added as a param group halfway. The loader rebuilds the saver's parameters
    # and param groups at its save before it loads.
    Axis(
        "history",
        ("plain", "frozen_midway", "group_added_midway"),
        "what happened before the save: plain training, some parameters frozen halfway (kept in "
        "the optimizer), or some unfrozen and added as a param group halfway",
        in_covering_at_default=False,
    ),
    # dcp: torch.distributed.checkpoint (every other axis says how); torch_checkpointing:
    # Meta's torch-checkpointing library (optional extra, requirements-torch-checkpointing.txt):
    # its CheckpointManager with DefaultResharder saves and loads (pipeline_lib.job.engines).
    # One engine both sides: neither reads the other's files (axes.CROSS_ENGINE), so a cell
    # saved by one and loaded by the other could only be a skip.
    Axis(
        "engine",
        ("dcp", "torch_checkpointing"),
        "the checkpoint library that saves and loads: DCP, or torch-checkpointing's "
        "CheckpointManager",
        in_covering_at_default=False,  # pairwise: dcp only (plan.config)
    ),
)
