"""The history axis (what happened before the save: pipeline_lib.job.histories), the stateless
optimizer sgd_plain, and check 2 on optimizer state a load drops or invents: pure logic, and one
torchrun run of single and fsdp2_2 savers under every history with adam and sgd_plain, two of its
cells with a fault that breaks the loader's optimizer state on purpose."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from pipeline_lib.common.errors import Incompatible
from pipeline_lib.frameworks import get as framework
from pipeline_lib.job import histories, optimizers
from pipeline_lib.plan import axes, config, grid
from pipeline_lib.plan.axes import Variant
from pipeline_lib.verify import checks, faults
from pipeline_lib.verify.entries import EMPTY_STATE, flatten, flatten_with_empty
from pipeline_lib.verify.live import Anatomy, live_state
from pipeline_lib.verify.reference import Reference
from pipeline_lib.verify.results import LoadRecord
from tests.jobs import check_written, cli_all
from tests.record_schemas import read_checked

TRAIN = {"steps": 2}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def _step(model: nn.Module, optimizer) -> None:
    model(torch.ones(3, 4)).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_the_axis_defaults_to_plain_and_keeps_the_default_matrix(small_config):
    assert axes.AXES["history"] == ("plain", "frozen_midway", "group_added_midway")
    assert Variant().history == "plain" and Variant().id == ""
    assert axes.variants(config.validate(small_config)) == [Variant()]
    assert Variant(history="frozen_midway").id == "history-frozen_midway"
    assert "sgd_plain" in axes.AXES["optimizer"]


def test_a_group_added_midway_has_no_warmup_schedule_a_skip():
    layout = grid.Layout("x", "fsdp2", (2,), ("shard",), None)
    variant = Variant(history="group_added_midway", optimizer="adam_lr_warmup")
    assert "a group added later has no schedule" in grid.skip_reason(variant, "save", layout)
    assert grid.skip_reason(replace(variant, history="frozen_midway"), "save", layout) is None


@pytest.mark.parametrize(
    ("history", "name", "steps", "frozen", "pipeline", "reason"),
    [
        ("frozen_midway", "fsdp1_flat", 2, frozenset(), False, "one FlatParameter"),
        ("frozen_midway", "fsdp2", 2, frozenset(), True, "pipeline parallelism"),
        ("frozen_midway", "fsdp2", 2, frozenset({"w"}), False, "frozen parameters of its own"),
        ("group_added_midway", "ddp", 2, frozenset(), False, "would not be averaged"),
        ("frozen_midway", "single", 1, frozenset(), False, "has no midway"),
        ("frozen_midway", "ddp", 2, frozenset(), False, "leaves its reduction unfinished"),
        ("frozen_midway", "tp", 2, frozenset(), False, None),
        ("group_added_midway", "fsdp2", 2, frozenset(), False, None),
        ("plain", "fsdp1_flat", 1, frozenset({"w"}), True, None),
    ],
)
def test_histories_that_cannot_happen_are_a_skip(history, name, steps, frozen, pipeline, reason):
    def check():
        histories.check(history, framework(name), {"steps": steps}, frozen, pipeline)

    if reason is None:
        check()
    else:
        with pytest.raises(Incompatible, match=reason):
            check()


def test_frozen_midway_keeps_the_frozen_parameters_and_their_state_in_the_optimizer():
    model = _model()
    histories.at_start("frozen_midway", model)
    optimizer, _ = optimizers.make("adam", model, 0.1)
    _step(model, optimizer)
    histories.at_midway("frozen_midway", model, optimizer)
    first = model[0].weight.detach().clone()
    _step(model, optimizer)
    assert histories.chosen(model) == [model[0].weight, model[0].bias]
    assert not model[0].weight.requires_grad and model[2].weight.requires_grad
    assert torch.equal(model[0].weight, first)  # frozen: no grad, no update
    assert len(optimizer.param_groups) == 1 and len(optimizer.state) == 4


def test_group_added_midway_adds_the_first_module_as_a_group():
    model = _model()
    histories.at_start("group_added_midway", model)
    optimizer, _ = optimizers.make("adam", model, 0.1)
    assert [len(g["params"]) for g in optimizer.param_groups] == [2]
    _step(model, optimizer)
    histories.at_midway("group_added_midway", model, optimizer)
    _step(model, optimizer)
    assert [len(g["params"]) for g in optimizer.param_groups] == [2, 2]
    assert optimizer.param_groups[1]["params"] == [model[0].weight, model[0].bias]
    assert all(p.requires_grad for p in model.parameters()) and len(optimizer.state) == 4
    # The loader: built as the saver was at the start, brought to its groups before the load.
    loader = _model()
    histories.at_start("group_added_midway", loader)
    loader_optimizer, _ = optimizers.make("adam", loader, 0.1)
    histories.as_at_save("group_added_midway", loader, loader_optimizer)
    assert [len(g["params"]) for g in loader_optimizer.param_groups] == [2, 2]


def test_sgd_plain_has_no_optimizer_state():
    model = _model()
    optimizer, scheduler = optimizers.make("sgd_plain", model, 0.1)
    _step(model, optimizer)
    assert scheduler is None and not optimizer.state
    assert optimizer.param_groups[0]["momentum"] == 0


def _live(model, optimizer) -> dict:
    return live_state(model, optimizer, None, Anatomy.of(model), {}, False, False)


def test_an_empty_optimizer_state_is_an_entry_of_its_own():
    model = _model()
    optimizer, _ = optimizers.make("sgd_plain", model, 0.1)
    name = f"optim.state.0.weight.{EMPTY_STATE}"
    assert not any(n.startswith("optim.state.") for n in _live(model, optimizer))
    optimizer.state[model[0].weight] = {}
    assert [n for n in _live(model, optimizer) if n.startswith("optim.state.")] == [name]
    parts = {"optim": {"state": {"0.weight": {}}, "param_groups": []}}
    assert name not in flatten(parts)  # flatten alone: {} has no leaves, it would vanish
    assert flatten_with_empty(parts)[name] == "empty"


@pytest.fixture
def one_process(monkeypatch):
    """check 2's comparisons in this process (one rank: the gather is the rank's own)."""
    monkeypatch.setattr(checks, "_gather", lambda mine: [mine])


def _loader_vs_saver(tmp_path, model, saver_optimizer, loader_optimizer) -> dict:
    Reference.write(str(tmp_path), _live(model, saver_optimizer), 0)
    found = checks.against_reference(
        _live(model, loader_optimizer), str(tmp_path), "the loader's state", Anatomy.of(model)
    )
    return {name: c.note for name, c in found.items() if not c.equal}


def test_check_2_names_the_optimizer_state_a_load_dropped(tmp_path, one_process):
    model = _model()
    saver, _ = optimizers.make("adam", model, 0.1)
    _step(model, saver)
    loader, _ = optimizers.make("adam", model, 0.1)
    loader.load_state_dict(saver.state_dict())
    assert _loader_vs_saver(tmp_path, model, saver, loader) == {}
    faults.break_loaded_optim_state("drop_loaded_optim_state", loader)
    assert _loader_vs_saver(tmp_path, model, saver, loader) == {
        f"optim.state.0.weight.{key}": "missing in the loader's state"
        for key in ("exp_avg", "exp_avg_sq", "step")
    }


def test_check_2_names_an_empty_optimizer_state_a_load_invented(tmp_path, one_process):
    model = _model()
    saver, _ = optimizers.make("sgd_plain", model, 0.1)
    _step(model, saver)
    loader, _ = optimizers.make("sgd_plain", model, 0.1)
    assert _loader_vs_saver(tmp_path, model, saver, loader) == {}
    faults.break_loaded_optim_state("add_empty_optim_state", loader)
    assert _loader_vs_saver(tmp_path, model, saver, loader) == {
        f"optim.state.0.weight.{EMPTY_STATE}": "not in the saver's state"
    }
    # And the other way: a saver's empty state the loader lacks.
    assert _loader_vs_saver(tmp_path / "back", model, loader, saver) == {
        f"optim.state.0.weight.{EMPTY_STATE}": "missing in the loader's state"
    }


# Saved under single and fsdp2_2, loaded into single, every history with adam and sgd_plain:
# 12 cells, 3 launches (configs/histories.yaml runs every pair of four layouts).
GRID = {
    "models": ["mlp"],
    "layouts": {
        "single": {"framework": "single", "mesh": [1]},
        "fsdp2_2": {"framework": "fsdp2", "mesh": [2]},
    },
    "pairs": [["single", "single"], ["fsdp2_2", "single"]],
    "train": {"steps": 2, "resume_steps": 2, "global_batch": 8},
    "run": {"cell_timeout_s": 180},
    "history": list(axes.AXES["history"]),
    "optimizer": ["adam", "sgd_plain"],
    "combine_axes": "product",
}
# Cells whose load breaks the loader's optimizer state on purpose: (history, optimizer, save
# layout, load layout) -> fault.
FAULTY = {
    ("plain", "adam", "fsdp2_2", "single"): "drop_loaded_optim_state",
    ("plain", "sgd_plain", "fsdp2_2", "single"): "add_empty_optim_state",
}


def _fault(variant: Variant, source, load_layout: str) -> str | None:
    return FAULTY.get((variant.history, variant.optimizer, source.layout.name, load_layout))


@pytest.fixture(scope="module")
def history_rows(tmp_path_factory) -> dict:
    """{(history, optimizer, save layout, load layout): row} of GRID's run."""
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp_path_factory.mktemp("histories"))
    mp.setenv("PYTHONPATH", str(__import__("tests.conftest").conftest.REPO))
    cfg = config.validate(GRID)
    saves = [grid.save_job_spec(cfg, root, layout) for root, layout in grid.save_jobs(cfg)]
    cli_all("save", saves)
    loads = []
    for root, layout in grid.load_jobs(cfg):
        spec = grid.load_job_spec(cfg, root, layout)
        items = tuple(
            replace(i, sources=tuple(replace(s, fault=_fault(i.variant, s, layout)) for s in i.sources))
            for i in spec.items
        )  # fmt: skip
        loads.append(replace(spec, items=items))
    cli_all("load", loads)
    check_written(saves + loads)
    rows = {}
    for spec in loads:
        for item in spec.items:
            for row in read_checked(item.record, LoadRecord).cells:
                key = (row["history"], row["optimizer"], row["save_layout"], row["load_layout"])
                rows[key] = row
    mp.undo()
    return rows


def _verdicts(rows: dict, history: str, optimizer: str) -> dict:
    return {
        (save, load): (row["status"], row["reason"])
        for (h, o, save, load), row in rows.items()
        if (h, o) == (history, optimizer) and (h, o, save, load) not in FAULTY
    }


@pytest.mark.torchrun
def test_plain_and_group_added_midway_pass_every_pair(history_rows):
    for history in ("plain", "group_added_midway"):
        for optimizer in ("adam", "sgd_plain"):
            verdicts = _verdicts(history_rows, history, optimizer)
            assert len(verdicts) == 2 - ((history, optimizer, "fsdp2_2", "single") in FAULTY)
            assert {v[0] for v in verdicts.values()} == {"pass"}, (history, optimizer, verdicts)


@pytest.mark.torchrun
def test_frozen_midway_drops_the_frozen_parameters_optimizer_state(history_rows):
    """A finding about torch 2.13 (pytorch #192202): the optimizer state of the parameters
    trained then frozen is not in the loader's state after the load, from either saver; a stateless
    optimizer has none to lose."""
    frozen = _verdicts(history_rows, "frozen_midway", "adam")
    assert set(frozen) == {("single", "single"), ("fsdp2_2", "single")}
    for (save, load), (status, reason) in frozen.items():
        assert status == "fail", (save, load, reason)
        assert "first optim.state.blocks.0.fc1.bias.exp_avg: missing in the loader's state" in (
            reason
        ), (save, load, reason)
    plain = _verdicts(history_rows, "frozen_midway", "sgd_plain")
    assert len(plain) == 2 and {v[0] for v in plain.values()} == {"pass"}, plain


@pytest.mark.torchrun
def test_a_broken_loaded_optimizer_state_fails_its_cell_naming_the_entry(history_rows):
    dropped = history_rows["plain", "adam", "fsdp2_2", "single"]
    assert dropped["status"] == "fail", dropped["reason"]
    assert (
        "optim.state.blocks.0.fc1.weight.exp_avg: missing in the loader's state"
        in (dropped["reason"])
    )
    invented = history_rows["plain", "sgd_plain", "fsdp2_2", "single"]
    assert invented["status"] == "fail", invented["reason"]
    assert (
        f"optim.state.blocks.0.fc1.weight.{EMPTY_STATE}: not in the saver's state"
        in (invented["reason"])
    )
