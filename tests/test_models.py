"""Models: every built-in and an import-path model implement the interface the worker uses; the
frozen and extra-state models hold what they exercise; an unusable import path is refused."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn

from pipeline_lib import models
from pipeline_lib.common import errors
from pipeline_lib.plan import config
from pipeline_lib.plan.config import ConfigError
from tests.jobs import run_matrix, tensors

EXAMPLE = "examples.my_model:build"
USER_MODULE_WITHOUT_TP_PLAN = """
import torch
from torch import nn

def build():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

def make_inputs(batch_size, generator):
    return torch.randn(batch_size, 4, generator=generator)
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """write(name, source): a module importable by ``name`` for this test only."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written = []

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


def check_training_step(model: nn.Module) -> None:
    """make_batch, forward, loss_sum and backward on one small batch: a finite loss, gradients."""
    inputs, targets = model.make_batch(0, 4, 0)
    assert inputs.shape[0] == 4
    loss, count = model.loss_sum(model(inputs), targets)
    # A built-in's targets, or one loss term per sample (an import-path model's fallback loss).
    terms = targets.numel() if isinstance(targets, torch.Tensor) else targets.samples
    assert torch.isfinite(loss) and count == terms == 4 * (terms // 4)
    loss.backward()
    assert any(p.grad is not None for p in model.parameters())


def check_interface(model: nn.Module) -> None:
    """What the worker calls: a training step, FSDP units and TP plan entries that are
    submodules, integer TP dims."""
    check_training_step(model)
    submodules = set(model.modules())
    assert all(unit in submodules for unit in model.fsdp_units())
    for key in model.tp_plan():
        if "*" not in key:
            model.get_submodule(key)
    assert all(isinstance(size, int) for size in model.tp_dims().values())


@pytest.mark.parametrize("name", models.names())
def test_builtin_model_implements_the_interface(name):
    torch.manual_seed(0)
    check_interface(models.get(name).build())


def test_names_list_the_builtins_only():
    assert {"mlp", "mlp_frozen", "mlp_extra_state"} <= set(models.names())
    assert not any(name.startswith("_") or ":" in name for name in models.names())


def test_frozen_model_freezes_its_first_block():
    model = models.get("mlp_frozen").build()
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"blocks.0.{fc}.{p}" for fc in ("fc1", "fc2") for p in ("weight", "bias")}
    inputs, targets = model.make_batch(0, 4, 0)
    model.loss_sum(model(inputs), targets)[0].backward()
    assert all((p.grad is None) == (not p.requires_grad) for p in model.parameters())


def test_extra_state_differs_between_seeds_and_is_restored_by_a_load():
    module = models.get("mlp_extra_state")
    torch.manual_seed(0)
    saver = module.build()
    torch.manual_seed(1)
    loader = module.build()
    state = saver.state_dict()
    assert set(state) >= {"input_scale._extra_state"}
    assert not any(key.startswith("input_scale.") and "extra" not in key for key in state)
    inputs, _ = saver.make_batch(0, 4, 0)
    saver(inputs)
    saved = saver.input_scale.get_extra_state()
    assert int(saved["forwards"]) == 1  # training changes it
    # A load that misses the extra state keeps the loader's values: they differ.
    assert not torch.equal(saved["scale"], loader.input_scale.get_extra_state()["scale"])
    loader.load_state_dict(saver.state_dict())
    loaded = loader.input_scale.get_extra_state()
    assert all(torch.equal(saved[key], loaded[key]) for key in ("scale", "forwards"))


def test_import_path_builds_the_example_with_the_interface():
    torch.manual_seed(0)
    model = models.get(EXAMPLE).build()
    check_interface(model)
    assert [type(unit).__name__ for unit in model.fsdp_units()] == ["GatedBlock"] * 2
    assert set(model.tp_plan()) == {f"user_model.blocks.*.{fc}" for fc in ("gate", "up", "down")}
    # No tp_dims of its own: the sizes its plan shards are torch's to shard, evenly or not.
    assert model.tp_dims() == {}


def test_import_path_batches_are_deterministic_per_seed_and_step():
    model = models.get(EXAMPLE).build()
    first = model.make_batch(3, 8, 0)[0]
    assert torch.equal(first, model.make_batch(3, 8, 0)[0])
    assert not torch.equal(first, model.make_batch(4, 8, 0)[0])
    assert not torch.equal(first, model.make_batch(3, 8, 1)[0])


def test_user_module_without_tp_plan_skips_tp_layouts(user_module):
    name = user_module("user_model_without_tp_plan", USER_MODULE_WITHOUT_TP_PLAN)
    model = models.get(f"{name}:build").build()
    check_training_step(model)
    assert model.tp_dims() == {}
    with pytest.raises(errors.Incompatible, match=f"^{name}:build has no tp_plan\\(model\\)$"):
        model.tp_plan()
    # Default FSDP units: the direct children that hold parameters (not the ReLU).
    assert model.fsdp_units() == [model.user_model[0], model.user_model[2]]


def test_worker_skips_on_the_adapters_incompatible():
    from pipeline_lib.job import worker

    assert worker.Incompatible is errors.Incompatible


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("examples.missing:build", "cannot import 'examples.missing': ModuleNotFoundError: "),
        ("examples.my_model:nope", "'examples.my_model' has no callable 'nope'"),
        ("examples.my_model:DIM", "'examples.my_model' has no callable 'DIM'"),
    ],
)
def test_unusable_import_path_says_why(name, expected):
    with pytest.raises(models.UserModelError) as exc:
        models.get(name)
    assert str(exc.value).startswith(expected)


def test_import_path_without_make_inputs_is_refused(user_module):
    name = user_module("user_model_without_inputs", "def build():\n    return None\n")
    with pytest.raises(models.UserModelError) as exc:
        models.get(f"{name}:build")
    expected = f"'{name}' has no make_inputs(batch_size, generator) beside 'build'"
    assert str(exc.value) == expected


def test_config_names_the_field_of_an_unusable_import_path(small_config):
    small_config["models"] += [EXAMPLE, "examples.missing:build"]
    with pytest.raises(ConfigError) as exc:
        config.validate(small_config)
    assert "config: models.2: cannot import 'examples.missing': ModuleNotFoundError" in str(
        exc.value
    )
    assert "models.1" not in str(exc.value)


@pytest.mark.torchrun
@pytest.mark.parametrize("model", ["mlp_extra_state", "mlp_frozen", EXAMPLE])
def test_new_models_load_bit_for_bit_from_fsdp2_into_single(in_tmp, model):
    cfg = {
        "models": [model],
        "layouts": {
            "fsdp2_2": {"framework": "fsdp2", "mesh": [2]},
            "single": {"framework": "single", "mesh": [1]},
        },
        "pairs": [["fsdp2_2", "single"]],
        "run": {"cell_timeout_s": 120},
    }
    row = run_matrix(cfg, model=model)["fsdp2_2", "single"]
    assert (row["status"], row["reason"]) == ("pass", "")
    entries = {t["entry"]: t for t in tensors(model, "single")}
    assert all(t["equal"] for t in entries.values())
    if model == "mlp_frozen":  # ignore_frozen_params: the frozen block is in no checkpoint
        assert not any(name.startswith("model.blocks.0.") for name in entries)
        assert "model.blocks.1.fc1.weight" in entries
    if model == "mlp_extra_state":
        for key in ("scale", "forwards"):
            assert entries[f"model.input_scale._extra_state.{key}"]["kind"] == "buffer"
