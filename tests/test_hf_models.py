"""Hugging Face models: outputs, inputs and the loss of a model of your own
(models._user), ``hf_models`` entries built without a file (models._hf), the TP plan mapped from
the config's ``base_model_tp_plan``, and that only those models import transformers."""

from __future__ import annotations

import json
import sys
import textwrap
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from pipeline_lib import models
from pipeline_lib.common import errors
from pipeline_lib.models._common import split_batch
from pipeline_lib.models._user import UserModel, first_float, model_loss
from pipeline_lib.plan import config
from pipeline_lib.plan.config import ConfigError
from tests import procs
from tests.conftest import REPO
from tests.jobs import run_grid

TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 64,
    "max_position_embeddings": 32,
}
FAMILIES = {
    "llama_gqa": {"architecture": "LlamaForCausalLM", "config": TINY},
    "qwen2_bias": {"architecture": "Qwen2ForCausalLM", "config": TINY},
    "llama_tied": {
        "architecture": "LlamaForCausalLM",
        "config": {**TINY, "num_key_value_heads": 4, "tie_word_embeddings": True},
    },
    "mixtral_moe": {
        "architecture": "MixtralForCausalLM",
        "config": {**TINY, "num_local_experts": 4, "num_experts_per_tok": 2},
    },
    "gpt2": {
        "architecture": "GPT2LMHeadModel",
        "config": {"n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 64, "n_positions": 32,
                   "bos_token_id": 0, "eos_token_id": 0},
    },
}  # fmt: skip


def build(name: str, seed: int = 0, **overrides) -> UserModel:
    torch.manual_seed(seed)
    entry = {**FAMILIES[name], **overrides}
    return models.get(name, {models.HF_KEY: entry}).build(hf=entry)


class Outputs(nn.Module):
    """Returns its linear layer's output in the form ``kind`` names."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.fc = kind, nn.Linear(3, 2)

    def forward(self, x):
        y = self.fc(x)
        ids = torch.zeros(x.shape[0], dtype=torch.int64)
        return {
            "tensor": y,
            "tuple": (ids, (y, y + 1)),
            "dict": {"ids": ids, "out": y},
            "loss_dict": {"loss": y.square().mean(), "out": y},
        }[self.kind]


class Source:
    """A user's module: make_inputs, and a loss only when given one."""

    def __init__(self, loss=None):
        if loss is not None:
            self.loss = loss

    @staticmethod
    def make_inputs(batch_size, generator):
        return torch.randn(batch_size, 3, generator=generator)


def user_model(kind: str, loss=None) -> UserModel:
    torch.manual_seed(0)
    return UserModel("t:build", Source(loss), Outputs(kind))


# --- outputs and loss -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tensor", "tuple", "dict"])
def test_fallback_loss_takes_the_first_floating_output(kind):
    model = user_model(kind)
    inputs, targets = model.make_batch(0, 4, 0)
    loss, terms = model.loss_sum(model(inputs), targets)
    expected = model.user_model.fc(inputs).square().sum()
    assert torch.equal(loss, expected) and terms == 4 and model.loss_source == "fallback"


def test_models_own_loss_is_used_and_counted_per_sample():
    model = user_model("loss_dict")
    inputs, targets = model.make_batch(0, 4, 0)
    loss, terms = model.loss_sum(model(inputs), targets)
    assert torch.equal(loss, model.user_model.fc(inputs).square().mean() * 4)
    assert terms == 4 and model.loss_source == "model"


def test_users_loss_is_used_when_the_model_returns_none():
    model = user_model("tensor", loss=lambda outputs, batch: (outputs - batch[:, :2]).abs().mean())
    inputs, targets = model.make_batch(0, 4, 0)
    loss, terms = model.loss_sum(model(inputs), targets)
    expected = (model.user_model.fc(inputs) - inputs[:, :2]).abs().mean() * 4
    assert torch.equal(loss, expected) and terms == 4 and model.loss_source == "user"


def test_an_output_without_a_floating_tensor_is_an_error_naming_the_model():
    assert model_loss((torch.ones(1),)) is None and model_loss(torch.ones(1)) is None
    with pytest.raises(ValueError, match=r"^m: the forward returned no floating tensor"):
        first_float({"ids": torch.zeros(2, dtype=torch.int64)}, "m")


def test_make_inputs_of_the_wrong_batch_size_is_an_error_naming_the_key():
    model = user_model("tensor")
    model.source.make_inputs = lambda n, g: {"x": torch.zeros(n, 3), "mask": torch.ones(n + 1)}
    with pytest.raises(ValueError, match=r"returned a batch of \(5,\) \(mask\)"):
        model.make_batch(0, 4, 0)


def test_dict_batches_split_every_tensor_on_dim_0():
    batch = {"input_ids": torch.arange(10).reshape(5, 2), "flag": True}
    parts = [split_batch(batch, 2, i) for i in range(2)]
    assert [p["input_ids"].shape[0] for p in parts] == [3, 2] and parts[1]["flag"] is True


# --- Hugging Face models ----------------------------------------------------------------------


def test_causal_lm_batch_is_token_ids_with_labels_and_its_own_loss():
    model = build("llama_gqa")
    inputs, targets = model.make_batch(0, 4, 0)
    assert set(inputs) == {"input_ids", "labels"} and inputs["input_ids"].shape == (4, 8)
    assert torch.equal(inputs["labels"], inputs["input_ids"])
    assert targets.terms.tolist() == [7] * 4  # the shift leaves 7 predicted tokens of 8
    outputs = model(inputs)
    loss, terms = model.loss_sum(outputs, targets)
    assert terms == 28 and torch.equal(loss, outputs.loss.float() * 28)
    assert model.loss_source == "model"
    assert model.user_model.config._attn_implementation == "eager"


def test_ignored_labels_are_not_loss_terms():
    model = build("llama_gqa")
    inputs, _ = model.make_batch(0, 4, 0)
    labels = inputs["labels"].clone()
    labels[0, 3:] = -100
    from pipeline_lib.models._user import model_loss_terms

    terms = model_loss_terms(model.user_model, {**inputs, "labels": labels}, 4)
    assert terms.tolist() == [2, 7, 7, 7]


def test_the_step_gradient_is_the_global_means_whatever_the_dp_split():
    """train()'s scaling, on one process: each data-parallel rank's loss_sum * dp / terms,
    gradients averaged over the ranks, equals the gradient of the global mean loss, also when
    the ranks hold different numbers of loss terms (ignored labels, uneven split)."""
    model = build("llama_gqa")
    inputs, targets = model.make_batch(0, 5, 0)
    inputs["labels"] = inputs["labels"].clone()
    inputs["labels"][0, 2:] = -100
    targets = type(targets)(inputs, targets.terms.clone())
    targets.terms[0] = 1
    params = [p for p in model.parameters() if p.requires_grad]
    model(inputs).loss.backward()
    expected = [p.grad.clone() for p in params]
    model.zero_grad()
    dp = 2
    total = int(targets.terms.sum())
    for rank in range(dp):
        x, y = split_batch(inputs, dp, rank), split_batch(targets, dp, rank)
        loss_sum, _ = model.loss_sum(model(x), y)
        (loss_sum * dp / total / dp).backward()  # / dp: DDP/FSDP average over the ranks
    for p, want in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-7)


def test_dropout_is_off_unless_the_config_sets_it():
    model = build("gpt2")
    assert model.user_model.config.resid_pdrop == 0.0 and model.user_model.config.attn_pdrop == 0
    kept = {**FAMILIES["gpt2"]["config"], "resid_pdrop": 0.2}
    assert build("gpt2", config=kept).user_model.config.resid_pdrop == 0.2


def test_fsdp_units_are_the_decoder_layers_and_tied_weights_stay_in_the_root():
    llama, gpt2, tied = build("llama_gqa"), build("gpt2"), build("llama_tied")
    assert llama.fsdp_units() == list(llama.user_model.model.layers)
    assert gpt2.fsdp_units() == list(gpt2.user_model.transformer.h)
    model = tied.user_model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    in_units = {id(p) for unit in tied.fsdp_units() for p in unit.parameters()}
    assert id(model.lm_head.weight) not in in_units


def test_tp_plan_maps_the_configs_base_plan_to_torch_styles():
    model = build("qwen2_bias")
    plan = model.tp_plan()
    prefix = "user_model.model.layers.*"
    assert isinstance(plan[f"{prefix}.self_attn.q_proj"], ColwiseParallel)
    assert isinstance(plan[f"{prefix}.self_attn.o_proj"], RowwiseParallel)
    assert isinstance(plan[f"{prefix}.mlp.down_proj"], RowwiseParallel)
    assert len(plan) == 7
    # The heads only: the projections' sizes are torch's to shard, evenly or not.
    assert model.tp_dims() == {"num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("mixtral_moe", "mixtral_moe: TP style 'packed_colwise' of layers.*.mlp.experts.gate_up_proj has no torch equivalent here"),
        ("gpt2", "gpt2: GPT2LMHeadModel has no base_model_tp_plan in its config (its Conv1D layers are not nn.Linear"),
    ],
)  # fmt: skip
def test_a_plan_that_cannot_apply_is_incompatible_with_its_reason(name, reason):
    model = build(name)
    with pytest.raises(errors.Incompatible) as exc:
        model.tp_plan()
    assert str(exc.value).startswith(reason)
    assert model.tp_dims() == {}  # a TP layout skips it anyway; other layouts run


def test_a_style_on_a_module_it_cannot_shard_is_incompatible():
    model = build("llama_gqa")
    model.user_model.config.base_model_tp_plan = {"layers.*.input_layernorm": "colwise"}
    with pytest.raises(
        errors.Incompatible, match=r"needs Linear: model\.layers\.0\.input_layernorm"
    ):
        model.tp_plan()
    model.user_model.config.base_model_tp_plan = {"layers.*.self_attn.nope": "rowwise"}
    with pytest.raises(errors.Incompatible, match="names no module"):
        model.tp_plan()


def test_hf_model_builds_the_same_for_the_same_seed_and_differs_for_another():
    a, b, c = build("llama_tied"), build("llama_tied"), build("llama_tied", seed=1)
    sa, sb, sc = (m.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(
        sa["user_model.model.embed_tokens.weight"], sc["user_model.model.embed_tokens.weight"]
    )


# --- config -----------------------------------------------------------------------------------


def hf_config(**entry) -> dict:
    return {
        "models": ["llm"],
        "hf_models": {"llm": {"architecture": "LlamaForCausalLM", "config": TINY, **entry}},
        "layouts": {"single": {"framework": "single", "mesh": [1]}},
    }


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        ({"architecture": "NopeForCausalLM"}, "hf_models.llm.architecture: transformers has no model class 'NopeForCausalLM'"),
        ({"config": {**TINY, "hiden_size": 3}}, "hf_models.llm.config.hiden_size: LlamaConfig has no 'hiden_size'"),
        ({"seq_len": 64}, "hf_models.llm.seq_len: 64 exceeds max_position_embeddings 32"),
        ({"seq_len": 1}, "hf_models.llm.seq_len: 1 is less than the minimum of 2"),
        ({"tokens": 3}, "hf_models.llm: Additional properties are not allowed ('tokens' was unexpected)"),
    ],
)  # fmt: skip
def test_config_names_the_field_of_a_bad_hf_model(entry, error):
    with pytest.raises(ConfigError) as exc:
        config.validate(hf_config(**entry))
    assert config.error_lines(exc.value) == [f"config: {error}"]


def test_config_refuses_an_hf_model_named_like_a_builtin_or_a_path():
    raw = hf_config()
    raw["hf_models"]["mlp"] = raw["hf_models"].pop("llm")
    raw["models"] = ["mlp"]
    with pytest.raises(ConfigError, match=r"hf_models\.mlp: 'mlp' is a built-in model's name"):
        config.validate(raw)
    raw["hf_models"] = {"../x": raw["hf_models"]["mlp"]}
    with pytest.raises(ConfigError, match=r"hf_models: '../x' does not match"):
        config.validate(raw)


def test_an_hf_model_reaches_the_jobs_through_model_kwargs():
    from pipeline_lib.plan import grid

    cfg = config.validate(hf_config())
    item = grid.save_job_spec(cfg, grid.RESULTS, "single").items[0]
    assert item.model_kwargs == {"hf": cfg["hf_models"]["llm"]}
    plain = config.validate({"models": ["mlp"], "layouts": cfg["layouts"]})
    spec = grid.save_job_spec(plain, grid.RESULTS, "single")
    assert "model_kwargs" not in spec.to_dict()["items"][0]


def test_only_hf_models_import_transformers():
    """The default matrix (config check, grid, a built-in's build and step) never imports
    transformers, nor _hf, nor peft; an hf_models config imports transformers, and peft only
    with LoRA adapters (configs/lora.yaml)."""
    script = textwrap.dedent(
        """
        import json, sys
        from pipeline_lib import models
        from pipeline_lib.plan import config, disk_estimate
        cfg = config.load("config.yaml")
        disk_estimate.grid_bytes(cfg)
        for name in cfg["models"]:
            model = models.get(name).build()
            inputs, targets = model.make_batch(0, 4, 0)
            model.loss_sum(model(inputs), targets)
        seen = ["transformers" in sys.modules, "peft" in sys.modules]
        config.load("configs/hf_models.yaml")
        seen += ["transformers" in sys.modules, "peft" in sys.modules]
        config.load("configs/lora.yaml")
        print(json.dumps([*seen, "peft" in sys.modules]))
        """
    )
    proc = procs.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == [False, False, True, False, True]


def test_hf_models_run_offline():
    build("llama_gqa")
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"


# --- torchrun ---------------------------------------------------------------------------------

EXPECTED_TP = {
    "mixtral_moe": "TP style 'packed_colwise' of layers.*.mlp.experts.gate_up_proj",
    "gpt2": "GPT2LMHeadModel has no base_model_tp_plan in its config",
}


@pytest.mark.torchrun
def test_every_family_under_fsdp2_and_tp(in_tmp, monkeypatch):
    """Each family saved and loaded under FSDP2 and TP (4 launches for all five): a pass bit
    for bit, or, for a TP plan that cannot apply, a skip with its reason."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    raw = {
        "models": list(FAMILIES),
        "hf_models": FAMILIES,
        "layouts": {
            "fsdp2_2": {"framework": "fsdp2", "mesh": [2]},
            "tp_2": {"framework": "tp", "mesh": [2]},
        },
        "pairs": [["fsdp2_2", "fsdp2_2"], ["fsdp2_2", "tp_2"], ["tp_2", "fsdp2_2"]],
        "train": {"steps": 2, "resume_steps": 2, "global_batch": 4},
        "run": {"cell_timeout_s": 300},
    }
    rows = run_grid(raw)
    assert len(rows) == 3 * len(FAMILIES)
    for (_, model, save, load), row in rows.items():
        if model in EXPECTED_TP and "tp_2" in (save, load):
            assert row["status"] == "skip" and EXPECTED_TP[model] in row["reason"], row
            continue
        assert (row["status"], row["reason"]) == ("pass", ""), (model, save, load)
        assert row["entries_mismatched"] == 0 and row["entries_checked"] > 20
        assert row["loss_source"] == "model"
        assert row["resume_max_rel_diff"] <= 1e-5


def test_readme_shows_the_hf_example_as_shipped():
    """README's "Your own model" config is examples/hf_llama.yaml (which test_docs checks and
    dry-runs), so it runs as given."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Your own model", 1)[1].split("## ", 1)[0]
    shown = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    shipped = (REPO / "examples" / "hf_llama.yaml").read_text().splitlines()
    assert shown.splitlines() == [line for line in shipped if not line.startswith("#")]


@pytest.mark.e2e
def test_hf_example_end_to_end(tmp_path):
    """examples/hf_llama.yaml through Snakemake (4 launches): every cell passes on the model's
    own loss, and the matrix says so."""
    import pandas as pd

    from tests.test_snakemake import snakemake

    (tmp_path / "config.yaml").write_text((REPO / "examples" / "hf_llama.yaml").read_text())
    snakemake(tmp_path)
    matrix = pd.read_parquet(tmp_path / "results" / "matrix.parquet")
    assert len(matrix) == 4 and set(matrix.model) == {"llama_tiny"}
    assert (matrix.status == "pass").all(), matrix[["save_layout", "load_layout", "reason"]]
    assert set(matrix.loss_source) == {"model"} and (matrix.resume_max_rel_diff <= 1e-5).all()
    tensors = pd.read_parquet(tmp_path / "results" / "tensors.parquet")
    assert "model.user_model.model.layers.1.self_attn.k_proj.weight" in set(tensors.entry)
    assert tensors.equal.all()


def test_reproducers_list_an_hf_model_cell_without_writing_a_script(tmp_path):
    import pandas as pd

    from pipeline_lib.results import reproducer
    from tests.test_baseline import cell

    cfg = config.validate(hf_config())
    rows = [cell("llm", save="single", load="single", status="fail", reason="load: differs")]
    written = reproducer.write_all(pd.DataFrame(rows), cfg, str(tmp_path / "reproducers"))
    index = (tmp_path / "reproducers" / "index.md").read_text()
    assert written == [] and "| fail | not reproduced: an hf_models model |" in index


# --- format hf_export -------------------------------------------------------------------------


def test_hf_export_loads_back_equal_and_a_corrupted_export_does_not(tmp_path):
    from pipeline_lib.job import hf_export

    model = build("llama_gqa")
    full = hf_export.exported_state(model.state_dict())
    path = tmp_path / "hf_export"
    hf_export.write(full, model.user_model.config, path)  # one process: no process group
    assert {"config.json", "model.safetensors.index.json"} <= {p.name for p in path.iterdir()}
    definition = model.source.definition
    assert hf_export.compare(definition, full, path, torch.float32, 0) == ""
    exported = next(path.glob("model-*.safetensors"))
    data = bytearray(exported.read_bytes())
    data[-4:] = bytes(b ^ 0xFF for b in data[-4:])  # the last tensor's last element
    exported.write_bytes(bytes(data))
    reason = hf_export.compare(definition, full, path, torch.float32, 0)
    assert reason.startswith("tensor ") and reason.endswith(
        "differs after from_pretrained (torch.float32 vs torch.float32)"
    )


def test_hf_export_logits_must_equal_the_savers(tmp_path):
    from pipeline_lib.job import hf_export

    model = build("llama_gqa")
    full = hf_export.exported_state(model.state_dict())
    path = tmp_path / "hf_export"
    hf_export.write(full, model.user_model.config, path)
    # The same tensors, but a config that computes otherwise: the logits check catches it.
    model.user_model.config.rope_parameters = {"rope_type": "default", "rope_theta": 1.0}
    model.user_model.config.save_pretrained(str(path))
    reason = hf_export.compare(model.source.definition, full, path, torch.float32, 0)
    assert reason.startswith("logits differ from the saver's (max_abs_diff ")


def test_a_failed_hf_export_fails_the_cell():
    from pipeline_lib.verify.records import verdict
    from pipeline_lib.verify.results import ExportCheck, LoadResult, SaveResult

    save = SaveResult(status="ok", reason="", state_check={}, files_check={}, resume_losses=[1.0],
                      dropped_entries=[], hf_export=ExportCheck(True))  # fmt: skip
    load = LoadResult(status="ok", reason="", entries={}, resume_losses=[1.0])
    assert verdict(save, load, 1e-5) == ("pass", "")
    save = replace(save, hf_export=ExportCheck(False, "tensor lm_head.weight differs"))
    assert verdict(save, load, 1e-5) == ("fail", "hf export: tensor lm_head.weight differs")


@pytest.mark.torchrun
def test_hf_export_under_fsdp2_and_tp(in_tmp, monkeypatch):
    """Format hf_export: a Llama saved under FSDP2 and under TP exports a folder that
    from_pretrained loads equal to the saver; a built-in model is a skip with the reason."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    raw = {
        "models": ["llama_gqa", "mlp"],
        "hf_models": {"llama_gqa": FAMILIES["llama_gqa"]},
        "layouts": {
            "fsdp2_2": {"framework": "fsdp2", "mesh": [2]},
            "tp_2": {"framework": "tp", "mesh": [2]},
        },
        "pairs": [["fsdp2_2", "tp_2"], ["tp_2", "fsdp2_2"]],
        "format": ["hf_export"],
        "train": {"steps": 2, "resume_steps": 2, "global_batch": 4},
        "run": {"cell_timeout_s": 300},
    }
    rows = run_grid(raw)
    for save, load in raw["pairs"]:
        row = rows["format-hf_export", "llama_gqa", save, load]
        assert (row["status"], row["reason"], row["hf_export_loads"]) == ("pass", "", True)
        skipped = rows["format-hf_export", "mlp", save, load]
        assert skipped["status"] == "skip" and skipped["hf_export_loads"] is None
        assert (
            "format hf_export exports Hugging Face models only (hf_models); mlp"
            in skipped["reason"]
        )
    exported = (
        in_tmp
        / "results"
        / "axes"
        / "format-hf_export"
        / "save"
        / "llama_gqa"
        / "tp_2"
        / "hf_export"
    )
    assert (exported / "config.json").is_file() and (
        exported / "model.safetensors.index.json"
    ).is_file()


USER_TRANSFORMERS_MODULE = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM

def build():
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    return LlamaForCausalLM(config)

def make_inputs(batch_size, generator):
    ids = torch.randint(64, (batch_size, 6), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
"""


def test_a_transformers_model_named_by_import_path_trains_on_its_own_loss(tmp_path, monkeypatch):
    """A reported bug: CausalLMOutputWithPast has no .float(); now its loss is the model's."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "user_llama.py").write_text(USER_TRANSFORMERS_MODULE)
    try:
        torch.manual_seed(0)
        model = models.get("user_llama:build").build()
        inputs, targets = model.make_batch(0, 4, 0)
        x = split_batch(inputs, 2, 1)
        outputs = model(x)
        loss, terms = model.loss_sum(outputs, split_batch(targets, 2, 1))
        assert terms == 2 * 5 and torch.equal(loss, outputs.loss.float() * 10)
        assert model.loss_source == "model" and x["attention_mask"].shape == (2, 6)
    finally:
        sys.modules.pop("user_llama", None)


def test_an_export_that_cannot_be_written_says_why(tmp_path):
    """Tied embeddings: DCP's HuggingFaceStorageWriter refuses tensors that share memory (kept
    as the export's failure, hf_export_loads false, not worked around)."""
    from pipeline_lib.job import hf_export

    model = build("llama_tied")
    state = hf_export.exported_state(model.state_dict())
    error = hf_export.write_error(state, model.user_model.config, tmp_path / "hf_export")
    assert error.startswith("cannot write: CheckpointException") and "share memory" in error
    llama = build("llama_gqa")
    state = hf_export.exported_state(llama.state_dict())
    assert hf_export.write_error(state, llama.user_model.config, tmp_path / "ok") == ""
