"""Config validation: every bad input is refused with a message naming the field."""

import pytest

from pipeline_lib.plan import config
from pipeline_lib.plan.config import ConfigError


def test_default_config_is_valid_and_defaults_are_filled(default_config):
    cfg = config.validate(default_config)
    assert cfg["pairs"] == "all"
    assert cfg["verify"]["resume_rtol"] > 0
    assert cfg["run"]["cell_timeout_s"] > 0


def test_defaults_fill_missing_sections(small_config):
    del small_config["train"]
    cfg = config.validate(small_config)
    assert cfg["train"] == {
        "steps": 2, "resume_steps": 2, "lr": 0.01, "seed": 0, "global_batch": 8,
    }  # fmt: skip
    assert cfg["optimizer"] == ["adam"] and cfg["mode"] == ["sharded"]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda c: c["layouts"]["x"].update(framework="zero3"),
            "layouts.x.framework: unknown framework 'zero3'",
        ),
        (lambda c: c["models"].append("resnet"), "models.1: unknown model 'resnet'"),
        (
            lambda c: c["layouts"]["x"].update(mesh=[2]),
            "layouts.x.mesh: framework hsdp needs 2 mesh dim(s)",
        ),
        (
            lambda c: c["layouts"]["x"].update(mesh=[0, 2]),
            "layouts.x.mesh.0: 0 is less than the minimum of 1",
        ),
        (
            lambda c: c["layouts"].update({"bad/name": {"framework": "ddp", "mesh": [2]}}),
            "'bad/name' does not match",
        ),
        (lambda c: c["models"].clear(), "models: the grid is empty (no models and no faults)"),
        (
            lambda c: c.update(
                faults=[{"fault": "melt", "model": "mlp", "save": "x", "load": "y"}]
            ),
            "faults.0.fault: unknown fault 'melt'",
        ),
        (
            lambda c: c.update(faults=[{"fault": "all", "model": "mlp", "save": "x", "load": "y"}]),
            "faults.0.load: unknown layout 'y'",
        ),
        (lambda c: c["layouts"].clear(), "layouts: {} should be non-empty"),
        (
            lambda c: c["layouts"].update(s={"framework": "single", "mesh": [2]}),
            "layouts.s.mesh: framework single runs on at most 1",
        ),
        (lambda c: c.update(pairs=[["x", "nope"]]), "pairs.0.1: unknown layout 'nope'"),
        (
            lambda c: c["train"].update(global_batch=2),
            "train.global_batch: 2 is smaller than the largest data-parallel degree 4",
        ),
        (lambda c: c["train"].update(steps=0), "train.steps: 0 is less than the minimum of 1"),
        (lambda c: c.update(extra=1), "Additional properties are not allowed ('extra'"),
        (lambda c: c["run"].update(device="tpu"), "run.device: 'tpu' is not one of"),
        (lambda c: c.update(mode=["sharded", "zip"]), "mode.1: unknown mode 'zip'"),
        (lambda c: c.update(format=["onnx"]), "format.0: unknown format 'onnx'"),
        (lambda c: c.update(async_save=[]), "async_save: [] should be non-empty"),
        (
            lambda c: c.update(param_dtype=["float32", "float32"]),
            "param_dtype: ['float32', 'float32']",
        ),
        (lambda c: c.update(load_init=["lazy"]), "load_init.0: unknown load_init 'lazy'"),
        (lambda c: c.update(optimizer="adam"), "optimizer: 'adam' is not of type 'array'"),
        (lambda c: c.update(optimizer=["adam", "lamb"]), "optimizer.1: unknown optimizer 'lamb'"),
        (lambda c: c.update(combine_axes="zip"), "combine_axes: 'zip' is not one of"),
    ],
)
def test_bad_config_names_the_field(mutate, expected):
    cfg = {
        "models": ["mlp"],
        "layouts": {"x": {"framework": "hsdp", "mesh": [2, 2]}},
        "train": {},
        "run": {},
    }
    mutate(cfg)
    with pytest.raises(ConfigError) as err:
        config.validate(cfg)
    assert expected in str(err.value)


def test_unreadable_file_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("models: [mlp\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: cannot read config"):
        config.load(path)


def test_config_hash_changes_with_content(small_config):
    a = config.config_hash(config.validate(small_config))
    small_config["train"]["steps"] = 3
    assert config.config_hash(config.validate(small_config)) != a


def test_save_sequences_need_the_exact_reference(small_config):
    small_config.update(save_sequence=["once", "load_last"], verify={"reference": "sealed"})
    with pytest.raises(config.ConfigError, match=r"save_sequence: load_last is checked against"):
        config.validate(small_config)
    small_config["verify"]["reference"] = "exact"
    config.validate(small_config)


def test_pipeline_parallel_layouts_need_the_exact_reference(small_config):
    small_config["layouts"]["pp_2"] = {"framework": "pp", "mesh": [2]}
    small_config["models"] = ["transformer"]
    config.validate(small_config)
    small_config["verify"] = {"reference": "sealed"}
    with pytest.raises(config.ConfigError, match=r"layouts.pp_2: a pipeline-parallel layout"):
        config.validate(small_config)


def test_sequence_faults_need_the_exact_reference(small_config):
    small_config["faults"] = [{"fault": "stale_save", "model": "mlp", "save": "single",
                               "load": "fsdp2_2"}]  # fmt: skip
    config.validate(small_config)
    small_config["verify"] = {"reference": "sealed"}
    with pytest.raises(config.ConfigError, match=r"stale_save a save sequence \(needs verify"):
        config.validate(small_config)
