"""Pipeline parallelism: stages split by layer with the full model's names,
GPipe and 1F1B schedules over microbatches, cells PP <-> other layouts and across PP degrees,
and a saver whose last stage writes nothing failing the cell with the entries named."""

from __future__ import annotations

import pytest
import torch

from pipeline_lib import frameworks
from pipeline_lib.common.errors import Incompatible
from pipeline_lib.job import pipelining
from pipeline_lib.models import mlp, transformer
from pipeline_lib.plan import config, grid
from pipeline_lib.verify import faults
from pipeline_lib.verify.reference import compare_list_part
from pipeline_lib.verify.results import EntryComparison
from tests import procs
from tests.jobs import run_matrix


def settings(stage: int, stages: int) -> pipelining.PipelineSettings:
    return pipelining.PipelineSettings(stage, stages, "1f1b", 4, group=None)


def test_pp_frameworks_register_their_mesh_dims_without_importing_torch():
    assert frameworks.get("pp").mesh_dims == ("pp",)
    assert frameworks.get("pp_fsdp2").mesh_dims == ("pp", "dp")
    three_d = frameworks.get("pp_fsdp2_tp")
    assert (three_d.mesh_dims, three_d.tp_dim, three_d.pp_dim) == (("pp", "dp", "tp"), "tp", "pp")
    # The pipeline dim is not data parallel: each stage's ranks split the batch over dp only.
    assert three_d.data_parallel_dims == ("dp",)


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_stages_keep_the_full_models_names_and_together_hold_all_of_them(stages):
    torch.manual_seed(0)
    whole = transformer.build().state_dict()
    held = []
    for stage in range(stages):
        torch.manual_seed(0)
        part = pipelining.split(transformer.build(), "transformer", settings(stage, stages))
        assert part.state_dict(), stage
        for name, value in part.state_dict().items():
            assert torch.equal(value, whole[name]), name
        held += list(part.state_dict())
    assert sorted(held) == sorted(whole)  # every entry on exactly one stage


def test_units_split_evenly_in_order_the_first_stages_taking_one_more():
    units = list(range(6))
    assert [pipelining.stage_of(units, s, 4) for s in range(4)] == [[0, 1], [2, 3], [4], [5]]
    assert [pipelining.stage_of(units, s, 2) for s in range(2)] == [[0, 1, 2], [3, 4, 5]]


def test_a_model_without_a_layer_stack_or_with_too_few_units_is_a_skip():
    with pytest.raises(Incompatible, match="mlp has no layer stack"):
        pipelining.split(mlp.build(), "mlp", settings(0, 2))
    with pytest.raises(Incompatible, match="5 pipeline stages need 5 units; transformer has 4"):
        pipelining.split(transformer.build(), "transformer", settings(0, 5))


def test_a_stage_forwards_what_the_next_stage_takes():
    torch.manual_seed(0)
    whole = transformer.build()
    tokens, _ = whole.make_batch(0, 2, 0)
    stages = []
    for stage in range(4):
        torch.manual_seed(0)
        stages.append(pipelining.split(transformer.build(), "transformer", settings(stage, 4)))
    x = tokens
    for part in stages:
        x = part(x)
    assert torch.equal(x, whole(tokens))


def test_schedule_and_microbatches_are_layout_keys_of_pipeline_frameworks_only():
    layouts = {
        "pp_2": {"framework": "pp", "mesh": [2], "schedule": "gpipe", "microbatches": 2},
        "pp_4": {"framework": "pp", "mesh": [4]},
    }
    cfg = config.validate({"models": ["transformer"], "layouts": layouts})
    found = grid.layouts(cfg)
    assert (found["pp_2"].schedule, found["pp_2"].microbatches) == ("gpipe", 2)
    assert (found["pp_4"].schedule, found["pp_4"].microbatches) == ("1f1b", 4)
    assert found["pp_4"].to_dict()["schedule"] == "1f1b"
    bad = {"fsdp2_2": {"framework": "fsdp2", "mesh": [2], "schedule": "gpipe"}}
    with pytest.raises(config.ConfigError, match=r"layouts\.fsdp2_2\.schedule: framework fsdp2"):
        config.validate({"models": ["mlp"], "layouts": bad})
    few = {"pp_4": {"framework": "pp", "mesh": [4], "microbatches": 2}}
    with pytest.raises(config.ConfigError, match=r"layouts\.pp_4\.microbatches: 1f1b needs"):
        config.validate({"models": ["mlp"], "layouts": few})
    unknown = {"pp_2": {"framework": "pp", "mesh": [2], "schedule": "zero_bubble"}}
    with pytest.raises(config.ConfigError, match=r"layouts\.pp_2\.schedule"):
        config.validate({"models": ["mlp"], "layouts": unknown})


def test_a_stages_part_of_a_list_entry_is_its_items_in_the_savers_order():
    union = ["a", "b", "c", "d"]
    assert compare_list_part(union, ["b", "c"]).equal
    assert compare_list_part(union, union).equal
    assert not compare_list_part(union, ["c", "b"]).equal
    outside = compare_list_part(union, ["b", "x"])
    assert not outside.equal and "'x' is in no saver's part" in outside.note


def test_pipeline_faults_are_not_in_the_campaign():
    assert set(faults.PIPELINE_FAULTS) == {"drop_last_stage", "drop_last_stage_export"}
    assert not set(faults.PIPELINE_FAULTS) & set(faults.FAULTS)


@pytest.mark.torchrun
def test_pp_cells_against_fsdp2_and_across_pipeline_degrees(in_tmp):
    """GPipe on 2 stages, 1F1B on 4: each saved and loaded against FSDP2 and the other PP
    degree, model and optimizer state exact, resumed losses within resume_rtol; a saver whose
    last stage writes no model entry (drop_last_stage) fails naming the entries."""
    layouts = {
        "fsdp2_2": {"framework": "fsdp2", "mesh": [2]},
        "pp_2": {"framework": "pp", "mesh": [2], "schedule": "gpipe", "microbatches": 2},
        "pp_4": {"framework": "pp", "mesh": [4], "schedule": "1f1b"},
        "pp_2_drop": {"framework": "pp", "mesh": [2]},
    }
    pairs = [["pp_2", "fsdp2_2"], ["fsdp2_2", "pp_2"], ["pp_2", "pp_4"], ["pp_4", "pp_2"],
             ["pp_2_drop", "fsdp2_2"]]  # fmt: skip
    raw = {"models": ["transformer"], "layouts": layouts, "pairs": pairs,
           "mode": ["flattened_optim"]}  # fmt: skip
    rows = run_matrix(raw, model="transformer", save_faults={"pp_2_drop": "drop_last_stage"})
    for pair in [("pp_2", "fsdp2_2"), ("fsdp2_2", "pp_2"), ("pp_2", "pp_4"), ("pp_4", "pp_2")]:
        assert (rows[pair]["status"], rows[pair]["reason"]) == ("pass", ""), pair
        assert rows[pair]["entries_checked"] > 100
    assert rows["pp_4", "pp_2"]["save_pp_schedule"] == "1f1b"
    assert rows["pp_4", "pp_2"]["load_pp_schedule"] == "gpipe"
    dropped = rows["pp_2_drop", "fsdp2_2"]
    assert dropped["status"] == "fail"
    # The last stage's entries: layers.1, norm and output; named in the reason.
    assert "missing in the saver's state dict" in dropped["reason"], dropped["reason"]
    assert "model.layers.1." in dropped["reason"] or "model.norm" in dropped["reason"]


LLAMA = {
    "architecture": "LlamaForCausalLM",
    "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64,
               "max_position_embeddings": 32},
}  # fmt: skip


@pytest.mark.torchrun
def test_hf_export_under_pp_keeps_every_stages_keys(in_tmp):
    """A Hugging Face decoder saved under 2 stages exports every stage's tensors (from_pretrained
    equal to the saver); a last stage that exports nothing fails the cell, naming a tensor."""
    layouts = {
        "single": {"framework": "single", "mesh": [1]},
        "pp_2": {"framework": "pp", "mesh": [2], "microbatches": 2},
        "pp_2_drop": {"framework": "pp", "mesh": [2], "microbatches": 2},
    }
    raw = {"models": ["llama"], "hf_models": {"llama": LLAMA}, "layouts": layouts,
           "pairs": [["pp_2", "single"], ["pp_2_drop", "single"]], "format": ["hf_export"],
           "train": {"global_batch": 4}}  # fmt: skip
    rows = run_matrix(raw, model="llama", save_faults={"pp_2_drop": "drop_last_stage_export"})
    assert rows["pp_2", "single"]["hf_export_loads"] is True
    dropped = rows["pp_2_drop", "single"]
    assert (dropped["status"], dropped["hf_export_loads"]) == ("fail", False)
    # The last stage's 11 tensors (layers.1, norm, lm_head), the first by name.
    assert (
        "hf export: 11 tensor(s) missing in the export; first lm_head.weight" in dropped["reason"]
    ), dropped["reason"]


def test_the_savers_list_is_the_union_of_the_stages_and_their_parts_must_cover_it(tmp_path):
    """A list entry each stage holds part of (its optimizer param group's names): the saver's
    reference holds the union; loaded parts that lack an item fail, naming it."""
    from pipeline_lib.verify.checks import _uncovered
    from pipeline_lib.verify.reference import Reference

    name = "optim.param_groups.0.params"
    Reference.write(str(tmp_path), {name: ["a", "b"]}, rank=0)
    Reference.write(str(tmp_path), {name: ["c"]}, rank=1)
    reference = Reference(str(tmp_path))
    assert reference.meta[name]["value"] == ["a", "b", "c"]
    assert reference.compare(name, ["a", "b", "c"]).equal  # a whole list: the union
    assert not reference.compare(name, ["a", "b"]).equal
    assert reference.compare(name, ["a", "b"], part=True).equal  # a stage's part
    assert _uncovered(reference, [{name: ["a"]}, {name: ["c"]}]) == {
        name: EntryComparison(False, None, "the stages' parts lack 1 of 3 items; first 'b'")
    }
    assert _uncovered(reference, [{name: ["a", "b"]}, {name: ["c"]}]) == {}


def test_a_rank_whose_param_group_lacks_a_setting_fails_though_another_holds_it():
    """Broken on purpose: stage 0's loaded group came without its hyperparameters (lr), stage
    1's has them; the entry is held by some rank, but not by every rank with that group."""
    from pipeline_lib.verify.checks import _group_gaps

    group = "optim.param_groups.0"
    reference = [f"{group}.lr", f"{group}.params", "optim.state.w.exp_avg"]
    whole = {f"{group}.lr", f"{group}.params"}
    assert _group_gaps(reference, [whole, whole], "the loader's state") == {}
    found = _group_gaps(reference, [{f"{group}.params"}, whole], "the loader's state")
    note = f"missing on rank 0 in the loader's state (its group {group})"
    assert found == {f"{group}.lr": EntryComparison(False, None, note)}
    # A rank without that group at all (a full state dict on rank 0 only) is not a gap.
    assert _group_gaps(reference, [whole, set()], "the loader's state") == {}


@pytest.mark.torchrun
def test_sharded_mode_under_pp_keeps_one_stages_param_group_and_the_cell_names_it(in_tmp):
    """The finding of docs/findings.md (pipeline parallelism, mode sharded): DCP writes one
    stage's ``param_groups.0.params``, and the other stage's optimizer loads a group without
    its hyperparameters. The cell fails naming both, and the resume's KeyError ends the cell
    on every stage at once (it used to wait in the next schedule until the cell timeout)."""
    layouts = {"pp_2": {"framework": "pp", "mesh": [2], "microbatches": 2}}
    raw = {"models": ["transformer"], "layouts": layouts, "pairs": [["pp_2", "pp_2"]],
           "mode": ["sharded"], "run": {"cell_timeout_s": 120}}  # fmt: skip
    row = run_matrix(raw, model="transformer")["pp_2", "pp_2"]
    assert row["status"] == "fail", row
    reason = row["reason"]
    assert (
        "files vs saver: 1 of" in reason
        and "first optim.param_groups.0.params: lists differ: 24 items != 12" in reason
    ), reason
    assert "missing on rank 0 in the loader's state (its group optim.param_groups.0)" in reason, (
        reason
    )
    assert reason.endswith("load error: resume: KeyError: 'betas'"), reason


@pytest.mark.torchrun
@pytest.mark.parametrize("flatten", [False, True])
def test_the_torch_only_reproducer_of_the_pp_param_group_finding(flatten, tmp_path):
    """docs/findings/pp_optim_param_groups.py prints BUG on this torch and OK with
    flatten_optimizer_state_dict=True (torchtitan's choice under PP)."""
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "docs/findings/pp_optim_param_groups.py"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    args = [*torchrun, str(script), *(["--flatten"] if flatten else [])]
    done = procs.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    if flatten:
        assert done.returncode == 0 and "OK: every stage's optimizer steps" in done.stdout, done
    else:
        assert done.returncode != 0, done.stdout
        assert "BUG: rank 0: Adam.step raised KeyError 'betas'" in done.stdout, done.stdout
