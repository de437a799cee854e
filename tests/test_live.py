"""The live state (pipeline_lib.verify.live) names and values every entry as get_state_dict does, without
it: single process, every built-in model, optimizer recipe and optimizer-state layout."""

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from pipeline_lib import models
from pipeline_lib.job import optimizers
from pipeline_lib.verify.bitwise import compare, shared_storage
from pipeline_lib.verify.entries import flatten
from pipeline_lib.verify.live import Anatomy, live_state, own_name


def trained(model_name: str, recipe: str):
    torch.manual_seed(0)
    model = models.get(model_name).build()
    optimizer, scheduler = optimizers.make(recipe, model, 0.01)
    inputs, targets = model.make_batch(0, 4, 0)
    model.loss_sum(model(inputs), targets)[0].backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return model, optimizer, scheduler


def through_api(model, optimizer, scheduler, flattened: bool, frozen: bool) -> dict:
    options = StateDictOptions(flatten_optimizer_state_dict=flattened, ignore_frozen_params=frozen)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    state = {"model": model_state, "optim": optim_state}
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    return flatten(state)


@pytest.mark.parametrize("model_name", models.names())
@pytest.mark.parametrize("recipe", ["adam", "adamw_param_groups", "adam_lr_warmup", "sgd"])
@pytest.mark.parametrize("flattened", [False, True])
def test_live_state_is_what_get_state_dict_gives(model_name, recipe, flattened):
    model, optimizer, scheduler = trained(model_name, recipe)
    anatomy = Anatomy.of(model)
    frozen = bool(anatomy.frozen)
    live = live_state(model, optimizer, scheduler, anatomy, {}, frozen, flattened)
    expected = through_api(model, optimizer, scheduler, flattened, frozen)
    assert sorted(live) == sorted(expected)
    for name, value in expected.items():
        assert compare(value, live[name]).equal, name
    assert shared_storage(live, anatomy.canonical) == {}


def test_anatomy_knows_ties_frozen_parameters_and_extra_state():
    tied = Anatomy.of(models.get("tied_embedding").build())
    assert tied.canonical("model.output.weight") == "model.embedding.weight"
    assert tied.canonical("optim.state.output.weight.exp_avg") == (
        "optim.state.embedding.weight.exp_avg"
    )
    assert "position_bias" not in tied.entries and "feature_scale" in tied.entries
    assert Anatomy.of(models.get("mlp_frozen").build()).frozen == {
        "blocks.0.fc1.weight", "blocks.0.fc1.bias", "blocks.0.fc2.weight", "blocks.0.fc2.bias",
    }  # fmt: skip
    assert "input_scale._extra_state" in Anatomy.of(models.get("mlp_extra_state").build()).entries


def test_wrapper_names_are_removed_the_way_wrappers_add_them():
    assert own_name("module.blocks.0.fc1.weight", ddp=True) == "blocks.0.fc1.weight"
    assert own_name("module.blocks.0.fc1.weight", ddp=False) == "module.blocks.0.fc1.weight"
    name = "_fsdp_wrapped_module.blocks.0._fsdp_wrapped_module._checkpoint_wrapped_module.fc1.bias"
    assert own_name(name, ddp=False) == "blocks.0.fc1.bias"
    assert own_name("_orig_mod.head.weight", ddp=False) == "head.weight"
    assert own_name("", ddp=True) == ""


def test_a_state_dict_that_returns_wrong_values_differs_from_the_live_state():
    model, optimizer, _ = trained("mlp", "adam")
    anatomy = Anatomy.of(model)
    live = live_state(model, optimizer, None, anatomy, {}, False, False)
    model_state, optim_state = get_state_dict(model, optimizer)
    entry = optim_state["state"]["blocks.0.fc1.bias"]
    entry["exp_avg"] = entry["exp_avg_sq"]  # one tensor under two names
    wrong = flatten({"model": model_state, "optim": optim_state})
    assert not compare(live["optim.state.blocks.0.fc1.bias.exp_avg"],
                       wrong["optim.state.blocks.0.fc1.bias.exp_avg"]).equal  # fmt: skip
    assert set(shared_storage(wrong, anatomy.canonical)) == {
        "optim.state.blocks.0.fc1.bias.exp_avg", "optim.state.blocks.0.fc1.bias.exp_avg_sq",
    }  # fmt: skip
