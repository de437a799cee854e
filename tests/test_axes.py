"""The checkpointing axes (modes, formats, async save, optimizers, dtypes, meta init): the grid
they expand to (pure), and real torchrun jobs for every value with a cross-framework pair."""

from __future__ import annotations

import pytest
import torch

from pipeline_lib.job import optimizers
from pipeline_lib.plan import axes, config, grid
from pipeline_lib.plan.axes import Variant
from pipeline_lib.verify.reference import Reference
from tests.jobs import run_grid

FSDP2_TO_SINGLE = {
    "models": ["mlp"],
    "layouts": {
        "fsdp2_2": {"framework": "fsdp2", "mesh": [2]},
        "single": {"framework": "single", "mesh": [1]},
    },
    "pairs": [["fsdp2_2", "single"]],
    "run": {"cell_timeout_s": 120},
}
EVERY_VALUE = {
    # tests/test_legacy.py runs modes legacy (FSDP1 only: a skip under fsdp2) and full_dcp.
    "mode": [m for m in axes.AXES["mode"] if m not in ("legacy", "full_dcp", "full_dcp_rank0")],
    "format": list(axes.AXES["format"]),
    "async_save": list(axes.AXES["async_save"]),
    "param_dtype": list(axes.AXES["param_dtype"]),
    "load_init": list(axes.AXES["load_init"]),
    "optimizer": list(axes.AXES["optimizer"]),
    "combine_axes": "one_at_a_time",
}


def test_defaults_are_one_variant_with_the_plain_paths(small_config):
    cfg = config.validate(small_config)
    assert axes.variants(cfg) == [Variant()]
    assert Variant().id == "" and Variant().label == "default"
    assert grid.version_roots(cfg) == {"results": None} and grid.job_root(None) == "results"


def test_one_at_a_time_varies_each_axis_alone(small_config):
    more = {"mode": list(axes.AXES["mode"]), "load_mode": list(axes.AXES["load_mode"])}
    more["load_process"] = list(axes.AXES["load_process"])
    more["save_sequence"] = list(axes.AXES["save_sequence"])
    more["frozen_params"] = list(axes.AXES["frozen_params"])
    more["history"] = list(axes.AXES["history"])
    more["engine"] = list(axes.AXES["engine"])
    cfg = config.validate({**small_config, **EVERY_VALUE, **more})
    variants = axes.variants(cfg)
    others = sum(len(values) - 1 for values in axes.AXES.values())
    assert len(variants) == 1 + others
    assert variants[0] == Variant()
    default = Variant().to_dict()
    assert all(sum(v.to_dict()[k] != default[k] for k in default) == 1 for v in variants[1:])
    assert Variant(mode="full").id == "mode-full"
    root = grid.job_root(None, Variant(param_dtype="bfloat16"))
    assert root == "results/axes/param_dtype-bfloat16"
    # One load job per layout runs every variant: an item each.
    job = grid.load_job_spec(cfg, "results", "fsdp2_2")
    assert len(job.items) == len(variants) and job.kind == "load"
    (item,) = [i for i in job.items if i.variant.param_dtype == "bfloat16"]
    assert item.sources[0].paths.checkpoint == f"{root}/save/mlp/single/checkpoint"
    assert item.record == f"{root}/load/mlp/fsdp2_2.json"


def test_product_combines_every_value(small_config):
    cfg = config.validate(
        {**small_config, "mode": ["sharded", "full"], "param_dtype": ["float32", "bfloat16"]}
    )
    assert {(v.mode, v.param_dtype) for v in axes.variants(cfg)} == {
        ("sharded", "float32"), ("sharded", "bfloat16"), ("full", "float32"), ("full", "bfloat16"),
    }  # fmt: skip
    assert Variant(mode="full", param_dtype="bfloat16").id == "mode-full+param_dtype-bfloat16"
    assert len(grid.cells(cfg)) == 4 * 4


@pytest.mark.parametrize(
    ("variant", "side", "world_size", "reason"),
    [
        (
            Variant(format="torch_save"),
            "load",
            2,
            "format torch_save is loaded in a single-process",
        ),
        (
            Variant(format="safetensors", mode="full"),
            "save",
            1,
            "format safetensors is tested with",
        ),
        (Variant(async_save="thread", mode="full"), "save", 2, "async_save thread writes DCP"),
        (
            Variant(format="safetensors", optimizer="adam_lr_warmup"),
            "save",
            2,
            "holds tensors only",
        ),
    ],
)
def test_combinations_that_cannot_run_are_skip_with_a_reason(variant, side, world_size, reason):
    layout = grid.Layout("x", "fsdp2", (world_size,), ("shard",), None)
    assert reason in grid.skip_reason(variant, side, layout)
    assert grid.skip_reason(Variant(format="torch_save"), "load", grid.Layout(
        "s", "single", (1,), ("world",), None)) is None  # fmt: skip


@pytest.mark.torchrun
def test_every_axis_value_passes_fsdp2_to_single(in_tmp):
    rows = run_grid({**FSDP2_TO_SINGLE, **EVERY_VALUE})
    assert len(rows) == len(axes.variants(config.validate({**FSDP2_TO_SINGLE, **EVERY_VALUE})))
    by_id = {key[0]: row for key, row in rows.items()}
    # A finding about torch 2.13: consolidation writes the 0-dim optimizer ``step`` that rank 1
    # saved as 0 (the sharded files hold the right value). Files vs saver names it.
    consolidated = by_id.pop("format-safetensors_consolidated")
    assert consolidated["status"] == "fail"
    assert consolidated["reason"].startswith("files vs saver: 10 of 40 entries differ; first ")
    assert ".step: bytes differ" in consolidated["reason"]
    # hf_export exports hf_models only (tests/test_hf_models.py runs it); mlp is a skip.
    exported = by_id.pop("format-hf_export")
    assert exported["status"] == "skip" and "hf_export" in exported["reason"]
    # Pinned-memory staging needs CUDA (tests/test_gpu.py runs it where there is one).
    if not torch.cuda.is_available():
        pinned = by_id.pop("async_save-process_pinned")
        assert pinned["status"] == "skip" and "needs CUDA" in pinned["reason"], pinned["reason"]
    for variant_id, row in by_id.items():
        assert (variant_id, row["status"], row["reason"]) == (variant_id, "pass", "")
        assert row["entries_checked"] > 10 and row["entries_mismatched"] == 0
    # Every axis is a column of its own.
    assert by_id["mode-full"]["mode"] == "full" and by_id["format-safetensors"]["format"] == (
        "safetensors"
    )
    assert by_id["mode-non_strict"]["missing_entries"] == "model.blocks.0.fc1.bias"
    assert by_id["mode-strict"]["resume_max_rel_diff"] is None
    thread = by_id["async_save-thread"]
    assert 0 < thread["save_blocked_seconds"] <= thread["save_seconds"]
    # flattened optimizer state has one entry per parameter and key
    assert by_id["mode-flattened_optim"]["entries_checked"] > by_id[""]["entries_checked"]
    # safetensors holds no param_groups; the scheduler adds its own entries
    assert by_id["format-safetensors"]["entries_checked"] < by_id[""]["entries_checked"]
    assert by_id["optimizer-adam_lr_warmup"]["entries_checked"] > by_id[""]["entries_checked"]


@pytest.mark.torchrun
def test_non_strict_load_restores_extra_state(in_tmp):
    """A state key holding a dict (extra state) is in the checkpoint as its flattened parts: a
    non-strict load must not take it for missing (it did, and never loaded the extra state)."""
    cfg = {
        "models": ["mlp_extra_state"],
        "layouts": {"single": {"framework": "single", "mesh": [1]}},
        "mode": ["non_strict"],
        "run": {"cell_timeout_s": 120},
    }
    (row,) = run_grid(cfg).values()
    assert (row["status"], row["reason"]) == ("pass", "")
    assert row["missing_entries"] == "model.blocks.0.fc1.bias"


@pytest.mark.torchrun
def test_meta_init_loads_into_sharded_and_replicated_layouts(in_tmp):
    cfg = {
        "models": ["mlp"],
        "layouts": {
            "ddp_2": {"framework": "ddp", "mesh": [2]},
            "tp_2": {"framework": "tp", "mesh": [2]},
            "fsdp1_2": {"framework": "fsdp1", "mesh": [2]},
            "fsdp2_2": {"framework": "fsdp2", "mesh": [2]},
        },
        # fsdp2_2 shards the meta model first and materializes only its shards.
        "pairs": [["ddp_2", "tp_2"], ["tp_2", "fsdp1_2"], ["fsdp1_2", "fsdp2_2"]],
        "load_init": ["meta"],
        "run": {"cell_timeout_s": 120},
    }
    rows = run_grid(cfg)
    assert {k[2:]: (r["status"], r["reason"]) for k, r in rows.items()} == {
        ("ddp_2", "tp_2"): ("pass", ""),
        ("tp_2", "fsdp1_2"): ("pass", ""),
        ("fsdp1_2", "fsdp2_2"): ("pass", ""),
    }


def test_no_decay_is_told_by_name():
    assert optimizers.no_decay("blocks.0.fc1.bias") and optimizers.no_decay("norm.weight")
    assert optimizers.no_decay("_fsdp_wrapped_module.layers.0.attention_norm.weight")
    assert not optimizers.no_decay("module.blocks.0.fc1.weight")
    assert not optimizers.no_decay("embedding.weight")


@pytest.mark.torchrun
def test_two_param_groups_survive_fsdp1(in_tmp):
    """FSDP1 flattens every parameter: groups told by shape put them all in one group and
    the other layouts could not load the checkpoint (nor FSDP1 theirs)."""
    cfg = {
        **FSDP2_TO_SINGLE,
        "layouts": {
            "fsdp1_2": {"framework": "fsdp1", "mesh": [2]},
            "ddp_2": {"framework": "ddp", "mesh": [2]},
        },
        "pairs": [["fsdp1_2", "ddp_2"], ["ddp_2", "fsdp1_2"]],
        "optimizer": ["adamw_param_groups"],
    }
    rows = run_grid(cfg)
    assert {k[2:]: (r["status"], r["reason"]) for k, r in rows.items()} == {
        ("fsdp1_2", "ddp_2"): ("pass", ""),
        ("ddp_2", "fsdp1_2"): ("pass", ""),
    }
    reference = Reference(
        grid.reference_dir("mlp", "fsdp1_2", "results/axes/optimizer-adamw_param_groups")
    )
    matrices, others = (reference.whole(f"optim.param_groups.{i}.params") for i in (0, 1))
    assert matrices == [
        f"{p}.weight"
        for p in ("blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2", "head")
    ]
    assert others == [m.replace("weight", "bias") for m in matrices]


@pytest.mark.torchrun
def test_full_state_dict_loads_into_multi_rank_layouts(in_tmp):
    """Rank 0 reads the file and broadcasts; the other ranks pass empty state dicts (a single
    set_state_dict call took theirs as optimizer-only and hung)."""
    cfg = {
        **FSDP2_TO_SINGLE,
        "layouts": {
            "fsdp2_2": {"framework": "fsdp2", "mesh": [2]},
            "ddp_2": {"framework": "ddp", "mesh": [2]},
            "single": {"framework": "single", "mesh": [1]},
        },
        "pairs": [["fsdp2_2", "ddp_2"], ["single", "fsdp2_2"]],
        "mode": ["full"],
    }
    rows = run_grid(cfg)
    assert {k[2:]: (r["status"], r["reason"]) for k, r in rows.items()} == {
        ("fsdp2_2", "ddp_2"): ("pass", ""),
        ("single", "fsdp2_2"): ("pass", ""),
    }
    assert all(r["entries_checked"] > 10 for r in rows.values())


@pytest.mark.torchrun
def test_fsdp1_full_state_dict_crash_is_a_crash_row(in_tmp):
    """torch 2.13 CPU: FSDP1 segfaults on rank 0 gathering a full state dict with cpu_offload."""
    cfg = {
        **FSDP2_TO_SINGLE,
        "layouts": {
            "fsdp1_2": {"framework": "fsdp1", "mesh": [2]},
            "single": {"framework": "single", "mesh": [1]},
        },
        "pairs": [["fsdp1_2", "single"]],
        "mode": ["full"],
    }
    (row,) = run_grid(cfg).values()
    assert row["status"] == "crash"
    assert row["reason"].startswith("save: rank 0 killed by SIGSEGV during state dict")
    assert row["mode"] == "full"
