"""LoRA adapters (peft) on an ``hf_models`` architecture: the entry's ``lora`` option and its
one-line errors, the names peft gives the state (live = state dict; peft's adapter file), the TP
plan of adapted layers, the adapter-only loader's base, the merged model's export, and one save
job + one load job (FSDP2 -> single) of the adapter-only and the full state, the merged export
and the fault that keeps rank 0's adapter shard only."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
from peft import get_peft_model_state_dict
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from pipeline_lib import models
from pipeline_lib.common.errors import Incompatible
from pipeline_lib.job import hf_export
from pipeline_lib.models import _lora
from pipeline_lib.plan import config, grid
from pipeline_lib.plan.axes import Variant
from pipeline_lib.plan.config import ConfigError
from pipeline_lib.verify.live import Anatomy, live_state
from pipeline_lib.verify.results import ExportCheck, LoadRecord, SaveRecord
from tests.record_schemas import read_checked

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64,
        "max_position_embeddings": 32}  # fmt: skip
LORA = {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]}
ENTRY = {"architecture": "LlamaForCausalLM", "config": TINY, "lora": LORA}
ADAPTED = 4 * 2  # target modules x layers


def build(seed: int = 0, base_seed: int | None = None, entry: dict = ENTRY):
    torch.manual_seed(seed)
    return models.get("lora", {models.HF_KEY: entry}).build(hf=entry, base_seed=base_seed)


def trained(model):
    """The model and an Adam over its trainable parameters after one step."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    inputs, targets = model.make_batch(0, 4, 0)
    model.loss_sum(model(inputs), targets)[0].backward()
    optimizer.step()
    return model, optimizer


# --- the option -------------------------------------------------------------------------------


def lora_config(**lora) -> dict:
    return {
        "models": ["llm"],
        "hf_models": {"llm": {**ENTRY, "lora": {**LORA, **lora}}},
        "layouts": {"single": {"framework": "single", "mesh": [1]}},
    }


@pytest.mark.parametrize(
    ("lora", "error"),
    [
        ({"dropout": 0.1}, "hf_models.llm.lora.dropout: 0.1: only 0 (dropout draws from each rank's RNG, so layouts would train on different masks)"),
        ({"target_modules": ["q_proj", "qkv"]}, "hf_models.llm.lora.target_modules.1: 'qkv' names no module of LlamaForCausalLM"),
        ({"rank": 0}, "hf_models.llm.lora.rank: 0 is less than the minimum of 1"),
        ({"target_modules": []}, "hf_models.llm.lora.target_modules: [] should be non-empty"),
        ({"alpha": 0}, "hf_models.llm.lora.alpha: 0 is less than or equal to the minimum of 0"),
        ({"bias": "all"}, "hf_models.llm.lora: Additional properties are not allowed ('bias' was unexpected)"),
    ],
)  # fmt: skip
def test_config_names_the_field_of_a_bad_lora_option(lora, error):
    with pytest.raises(ConfigError) as exc:
        config.validate(lora_config(**lora))
    assert config.error_lines(exc.value) == [f"config: {error}"]


def test_config_names_an_unknown_frozen_params_value():
    with pytest.raises(ConfigError) as exc:
        config.validate({**lora_config(), "frozen_params": ["ignored", "kept"]})
    assert config.error_lines(exc.value) == [
        "config: frozen_params.1: unknown frozen_params 'kept' (known: ignored, saved)"
    ]


def test_the_base_is_frozen_and_the_adapters_train():
    model = build()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * ADAPTED and all(".lora_" in n for n in trainable)
    assert model.loss_source is None and type(model.user_model).__name__.endswith("ForCausalLM")


def test_an_adapter_only_loaders_base_is_the_savers_and_its_adapters_its_own():
    """base_seed: the base from that seed, the adapters from the job's (the loader's) seed."""
    saver, loader, other = build(0), build(1, base_seed=0), build(1)  # other: a full state's
    state = [dict(m.named_parameters()) for m in (saver, loader, other)]
    base = "user_model.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    adapter = "user_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert torch.equal(state[0][base], state[1][base])
    assert not torch.equal(state[0][adapter], state[1][adapter])
    assert not torch.equal(state[0][base], state[2][base])


# --- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ignore_frozen", [True, False])
def test_live_state_names_entries_as_the_state_dict_does(ignore_frozen):
    """PEFT's layers name their base layer's weight ``...q_proj.base_layer.weight`` in
    named_parameters and in the state dict alike: the live reader and get_state_dict give the
    same entries (a reader that mapped base_layer away, as peft's adapter file does, would not)."""
    model, optimizer = trained(build())
    options = StateDictOptions(ignore_frozen_params=ignore_frozen)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    from pipeline_lib.verify.entries import flatten

    api = set(flatten({"model": model_state, "optim": optim_state}))
    live = live_state(model, optimizer, None, Anatomy.of(model), {}, ignore_frozen, False)
    assert set(live) == api
    assert any(".base_layer." in n for n in api) != ignore_frozen


def test_the_adapter_only_state_is_peft_s_adapter_state_by_name():
    """The adapter-only checkpoint's model entries are peft's own adapter state
    (get_peft_model_state_dict, what save_pretrained writes), named without the adapter's name."""
    model, optimizer = trained(build())
    options = StateDictOptions(ignore_frozen_params=True)
    model_state, _ = get_state_dict(model, optimizer, options=options)
    peft_state = get_peft_model_state_dict(model.user_model)
    assert {_lora.peft_name(f"model.{n}") for n in model_state} == set(peft_state)
    for name, value in model_state.items():
        assert torch.equal(value, peft_state[_lora.peft_name(f"model.{name}")])


# --- TP plan ----------------------------------------------------------------------------------


def test_tp_plan_shards_each_adapted_layer_and_its_adapter_on_one_dim():
    plan = build().tp_plan()
    layers = "user_model.base_model.model.model.layers.*"
    assert isinstance(plan[f"{layers}.self_attn.q_proj.base_layer"], ColwiseParallel)
    assert isinstance(plan[f"{layers}.self_attn.q_proj.lora_B.default"], ColwiseParallel)
    assert isinstance(plan[f"{layers}.self_attn.o_proj.base_layer"], RowwiseParallel)
    assert isinstance(plan[f"{layers}.self_attn.o_proj.lora_A.default"], RowwiseParallel)
    assert isinstance(plan[f"{layers}.self_attn.k_proj"], ColwiseParallel)  # not adapted
    assert not any(k.endswith(("q_proj.lora_A.default", "o_proj.lora_B.default")) for k in plan)
    assert len(plan) == 7 + ADAPTED // 2  # every base key, plus one adapter key per adapted key


def test_a_lora_layer_under_another_style_is_incompatible():
    with pytest.raises(Incompatible, match="TP style Replicate of x on a LoRA layer"):
        from torch.distributed.tensor import Replicate

        _lora.lora_tp_plan("x", Replicate(), "lora")


def test_frozen_params_saved_on_a_model_without_frozen_parameters_is_a_skip():
    from pipeline_lib.job.training import check_frozen
    from pipeline_lib.models import mlp

    item = type("I", (), {"variant": Variant(frozen_params="saved"), "spec": None})()
    item.spec = type("S", (), {"model": "mlp"})()
    with pytest.raises(Incompatible, match=r"^frozen_params saved: mlp has no frozen parameters"):
        check_frozen(item, Anatomy.of(mlp.build()))
    check_frozen(item, Anatomy.of(build()))  # a LoRA model has some: runs


def test_an_adapter_only_load_into_a_meta_model_is_a_skip():
    """The base of a loader built on the meta device gets no values from an adapter-only
    checkpoint (measured before this skip: NaN resumed losses); from the full state it does."""
    from pipeline_lib.job.training import check_frozen

    item = type("I", (), {"variant": Variant(), "spec": None})()
    with pytest.raises(Incompatible, match=r"^load_init meta: the checkpoint leaves the frozen"):
        check_frozen(item, Anatomy.of(build()), meta=True)
    item.variant = Variant(frozen_params="saved")
    check_frozen(item, Anatomy.of(build()), meta=True)


# --- merged export ----------------------------------------------------------------------------


def test_the_merged_export_loads_as_the_merged_model_and_an_unmerged_one_does_not(tmp_path):
    """hf_export's check of a LoRA model's export: the merged state (merge_and_unload) written
    with DCP's HuggingFaceStorageWriter loads with from_pretrained equal to it; an export of
    the base without its adapters (a merge forgotten) fails naming the tensor."""
    model, _ = trained(build())
    with torch.no_grad():  # adapters that change every adapted weight
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.add_(0.5)
    state = hf_export.exported_state(model.state_dict())
    merged = model.source.merged_state(state, torch.float32)
    definition, config_ = model.source.definition, model.source.config
    assert not hf_export.write_error(merged, config_, tmp_path / "merged", no_dist=True)
    assert hf_export.compare(definition, merged, tmp_path / "merged", torch.float32, 0) == ""
    base = {
        k.removeprefix(_lora.PEFT_PREFIX).replace(".base_layer.", "."): v
        for k, v in state.items()
        if ".lora_" not in k
    }
    assert set(base) == set(merged)
    assert not hf_export.write_error(base, config_, tmp_path / "base", no_dist=True)
    reason = hf_export.compare(definition, merged, tmp_path / "base", torch.float32, 0)
    assert reason.startswith("tensor model.layers.0.self_attn.q_proj.weight differs"), reason


# --- torchrun: one save job (FSDP2) and one load job (single) --------------------------------

# Variants (one at a time): the adapter-only checkpoint (default), the full state, the
# adapter-only full state dict on rank 0 (accelerate's FULL_STATE_DICT), the merged export.
# Model lora_fault (the same definition) runs the first and the third with the fault.
FAULTY = "lora_fault"
FAULT_VARIANTS = ("", "mode-full")


@pytest.fixture(scope="module")
def fsdp2_to_single(tmp_path_factory):
    """{(model, variant id): (save record, load row)} of one FSDP2 save job and one single
    load job."""
    from tests.conftest import REPO
    from tests.jobs import cli

    raw = {
        "models": ["lora", FAULTY],
        "hf_models": {"lora": ENTRY, FAULTY: ENTRY},
        "layouts": {
            "fsdp2_2": {"framework": "fsdp2", "mesh": [2]},
            "single": {"framework": "single", "mesh": [1]},
        },
        "pairs": [["fsdp2_2", "single"]],
        "frozen_params": ["ignored", "saved"],
        "mode": ["sharded", "full"],
        "format": ["dcp", "hf_export"],
        "combine_axes": "one_at_a_time",
        "train": {"steps": 2, "resume_steps": 2, "global_batch": 4},
        "run": {"cell_timeout_s": 300},
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("lora"))
        patch.setenv("PYTHONPATH", str(REPO))
        patch.setenv("OMP_NUM_THREADS", "1")
        cfg = config.validate(raw)
        kept = [(m, v) for v, m in grid.items(cfg) if m != FAULTY or v.id in FAULT_VARIANTS]

        def narrowed(spec):
            items = [i for i in spec.items if (i.model, i.variant) in kept]
            faulty = [
                replace(i, fault="adapter_rank0_shard")
                if i.model == FAULTY and i.kind == "save"
                else i
                for i in items
            ]
            return replace(spec, items=tuple(faulty))

        save = narrowed(grid.save_job_spec(cfg, grid.RESULTS, "fsdp2_2"))
        cli("save", save)
        load = narrowed(grid.load_job_spec(cfg, grid.RESULTS, "single"))
        cli("load", load)
        saves = {(i.model, i.variant.id): read_checked(i.record, SaveRecord) for i in save.items}
        return {
            (i.model, i.variant.id): (
                saves[i.model, i.variant.id],
                read_checked(i.record, LoadRecord).cells[0],
            )
            for i in load.items
        }


@pytest.mark.torchrun
def test_adapter_only_and_full_state_load_under_another_layout(fsdp2_to_single):
    """The adapter-only checkpoint holds the adapters and their optimizer state only, the full
    state the base too; both load bit for bit into a single-process model (the adapter-only one
    on the base from the saver's seed) and resume like the saver, in DCP and as a full state
    dict on rank 0 (accelerate's FULL_STATE_DICT: the loader passes strict=False, as it must for
    a state without the frozen parameters)."""
    for variant in ("", "frozen_params-saved", "mode-full"):
        save, row = fsdp2_to_single["lora", variant]
        assert (row["status"], row["reason"]) == ("pass", ""), (variant, row["reason"])
        assert row["resume_max_rel_diff"] <= 1e-5 and row["frozen_params"] in ("ignored", "saved")
        models_ = [n for n in save.entries if n.startswith("model.")]
        adapters = [n for n in models_ if any(p in n for p in (".lora_A.", ".lora_B."))]
        assert len(adapters) == 2 * ADAPTED
        if variant == "frozen_params-saved":
            assert any(".base_layer." in n for n in models_) and len(models_) > len(adapters)
        else:  # trainable entries only, and their optimizer state
            assert models_ == adapters and not save.frozen_saved
            states = {n.rpartition(".")[0] for n in save.entries if n.startswith("optim.state.")}
            assert states == {f"optim.state.{n.removeprefix('model.')}" for n in adapters}


@pytest.mark.torchrun
def test_the_merged_model_exports_for_hugging_face(fsdp2_to_single):
    save, row = fsdp2_to_single["lora", "format-hf_export"]
    assert save.hf_export == ExportCheck(loads=True, reason="")
    assert row["status"] == "pass", row["reason"]


@pytest.mark.torchrun
@pytest.mark.parametrize("variant", FAULT_VARIANTS)
def test_a_save_that_keeps_rank_0s_adapter_shard_fails_naming_the_adapter(fsdp2_to_single, variant):
    """Fault adapter_rank0_shard (accelerate PR #4206): the files hold rank 0's part of each
    adapter weight and zeros for rank 1's; check 1 (files vs saver) and check 2 name an adapter
    entry, in DCP and in the full state dict on rank 0."""
    _, row = fsdp2_to_single[FAULTY, variant]
    assert row["status"] == "fail"
    adapter = r"first model\.user_model\.\S+\.lora_[AB]\.default\.weight: bytes differ"
    checks = [rf"files vs saver: {2 * ADAPTED} of \d+ entries differ; {adapter}"]
    checks.append(rf"loader vs saver: {2 * ADAPTED} of \d+ entries differ; {adapter}")
    assert all(re.search(check, row["reason"]) for check in checks), row["reason"]
