"""Typed job specs (pipeline_lib.plan.specs): every spec the grid writes survives the JSON round trip
unchanged, and a spec of another form is refused naming the key. Pure."""

import json
import re
from dataclasses import replace

import pytest

from pipeline_lib.plan import config, grid
from pipeline_lib.plan.specs import CheckpointPaths, JobSpec, SpecError, unit_id

CONFIG = {
    "models": ["mlp", "tied_embedding"],
    "layouts": {
        "single": {"framework": "single", "mesh": [1]},
        "fsdp2_2": {"framework": "fsdp2", "mesh": [2]},
    },
    "mode": ["sharded", "full"],
    "torch_versions": {"t2_13": "torch==2.13.0", "t2_14": "torch==2.14.1"},
    "faults": [{"fault": "all", "model": "mlp", "save": "single", "load": "fsdp2_2"}],
}


def every_job_spec() -> list[JobSpec]:
    cfg = config.validate(CONFIG)
    specs = [
        build(cfg, root, layout)
        for build in (grid.save_job_spec, grid.load_job_spec)
        for root in grid.version_roots(cfg)
        for layout in cfg["layouts"]
    ]
    for cell in grid.fault_cells(cfg):
        specs += [grid.fault_save_spec(cfg, cell), grid.fault_load_spec(cfg, cell)]
    return specs


def test_every_spec_the_grid_writes_round_trips_through_json():
    specs = every_job_spec()
    assert len(specs) > 40
    for spec in specs:
        spec = replace(spec, launched_at=1.5)
        as_json = json.loads(json.dumps(spec.to_dict()))
        typed = JobSpec.from_dict(as_json)
        assert typed == spec
        assert typed.launched_at == 1.5 and all(item.kind == typed.kind for item in typed.items)


def test_typed_fields_say_what_they_hold():
    cfg = config.validate(CONFIG)
    save = grid.save_job_spec(cfg, "results/torch/t2_14", "fsdp2_2")
    item = save.items[0]
    assert item.paths == CheckpointPaths(
        "results/torch/t2_14/save/mlp/fsdp2_2/checkpoint",
        "results/torch/t2_14/save/mlp/fsdp2_2/full_state.pt",
        "results/torch/t2_14/save/mlp/fsdp2_2/reference",
    )
    full = next(i for i in save.items if i.variant.mode == "full")
    assert full.paths.read_by(full.variant).endswith("full_state.pt")
    assert save.units() == [str(i) for i in range(len(save.items))]
    load = grid.load_job_spec(cfg, "results/torch/t2_14", "single")
    assert load.units()[:2] == ["0.t2_13.single", "0.t2_13.fsdp2_2"]
    assert unit_id("3", "t2_13.single") == "3.t2_13.single" and unit_id("3") == "3"
    fault = next(s for s in every_job_spec() if s.kind == "load" and s.items[0].fault_tag)
    tag = fault.items[0].fault_tag
    assert tag.expect in ("fail", "error", "crash", "timeout") and tag.id.endswith("single.fsdp2_2")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.update(colour="red"), "JobSpec: unknown key(s) colour"),
        (
            lambda s: s["items"][0].update(reference_dir="x"),
            "ItemSpec: unknown key(s) reference_dir",
        ),
        (lambda s: s["items"][0].pop("checkpoint"), "checkpoint"),
    ],
)
def test_a_spec_of_another_form_is_refused(change, message):
    spec = grid.save_job_spec(config.validate(CONFIG), "results/torch/t2_13", "single").to_dict()
    change(spec)
    with pytest.raises((SpecError, KeyError), match=re.escape(message)):
        JobSpec.from_dict(spec)
