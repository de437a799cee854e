"""Save mode != load mode (axis load_mode) and the strict loads that meet an unexpected entry
(modes strict_unexpected, non_strict_unexpected): the variants and their skips (pure), the
verdict's accounts (pure), the reference in the loader's form, and real torchrun cells, each
check broken on purpose once."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from pipeline_lib.plan import axes, config, grid
from pipeline_lib.plan.axes import Variant
from pipeline_lib.results import reproducer
from pipeline_lib.verify import faults, records
from pipeline_lib.verify.entries import UNEXPECTED_ENTRY
from pipeline_lib.verify.reference import Reference, load_form_dir
from pipeline_lib.verify.results import LoadResult, SaveResult
from tests.jobs import run_grid
from tests.test_torchrun import DDP_TO_FSDP2

FIRST = "model.blocks.0.fc1.bias"  # mlp's first model entry


def test_same_keeps_every_existing_variant_id_and_path(small_config):
    assert Variant(load_mode="same").id == "" and grid.job_root(None) == "results"
    assert Variant(mode="full").id == "mode-full"
    cfg = config.validate({**small_config, "mode": ["sharded", "full"]})
    assert [v.id for v in axes.variants(cfg)] == ["", "mode-full"]
    pair = Variant(mode="full", load_mode="sharded")
    assert pair.id == "mode-full+load_mode-sharded"
    assert grid.job_root(None, pair) == "results/axes/mode-full+load_mode-sharded"


def test_each_side_has_its_own_mode():
    pair = Variant(mode="sharded", load_mode="flattened_optim")
    assert (pair.side_mode("save"), pair.side_mode("load")) == ("sharded", "flattened_optim")
    assert pair.forms_differ and not pair.loads_full
    assert Variant(mode="flattened_optim").flattened("load") and not Variant().forms_differ
    assert Variant(mode="sharded", load_mode="full").loads_full
    full_to_sharded = Variant(mode="full", load_mode="sharded")
    assert full_to_sharded.writes_full_state and full_to_sharded.reads_full_state
    assert not full_to_sharded.loads_full


@pytest.mark.parametrize(
    ("variant", "reason"),
    [
        (Variant(mode="full", load_mode="full"), "load_mode full is mode full itself"),
        (Variant(load_mode="sharded"), "load_mode sharded is mode sharded itself"),
        (Variant(mode="strict", load_mode="full"), "load_mode pairs modes sharded, full"),
        (Variant(mode="strict_unexpected", load_mode="sharded"), "(mode strict_unexpected)"),
        (Variant(load_mode="full", format="safetensors"), "tested with format dcp only"),
        (Variant(mode="strict_unexpected", format="safetensors"), "tested with mode sharded"),
    ],
)
def test_pairs_that_cannot_run_are_skip_with_a_reason(variant, reason):
    layout = grid.Layout("x", "fsdp2", (2,), ("shard",), None)
    assert reason in grid.skip_reason(variant, "save", layout)


def test_unknown_load_mode_is_refused(small_config):
    with pytest.raises(config.ConfigError, match=r"load_mode\.0: unknown load_mode 'half'"):
        config.validate({**small_config, "load_mode": ["half"]})


SAVE = {"status": "ok", "state_check": {}, "files_check": {}, "resume_losses": [1.0, 0.5]}
ADDED = {**SAVE, "dropped_entries": [], "added_entries": [UNEXPECTED_ENTRY]}
NAMED = 'RuntimeError: Error(s) in loading state_dict for MLP: Unexpected key(s) in state_dict: "dcp_matrix_unexpected".'


@pytest.mark.parametrize(
    ("mode", "load", "expected"),
    [
        ("strict_unexpected", {"status": "ok", "strict_error": NAMED}, ("pass", "")),
        (
            "strict_unexpected",
            {"status": "ok"},
            ("fail", f"strict load: a checkpoint with {UNEXPECTED_ENTRY} loaded without an error"),
        ),
        (
            "strict_unexpected",
            {"status": "ok", "strict_error": "RuntimeError: Missing key: fc1.bias."},
            (
                "fail",
                f"strict load: failed without naming the unexpected entry {UNEXPECTED_ENTRY}: "
                "RuntimeError: Missing key: fc1.bias.",
            ),
        ),
        (
            "non_strict_unexpected",
            {"status": "ok", "entries": {}, "resume_losses": [1.0, 0.5]}
            | {"unexpected_entries": [UNEXPECTED_ENTRY]},
            ("pass", ""),
        ),
        (
            "non_strict_unexpected",
            {"status": "ok", "entries": {}, "resume_losses": [1.0, 0.5], "unexpected_entries": []},
            (
                "fail",
                f"non-strict load: reported unexpected [], the saver added [{UNEXPECTED_ENTRY}]",
            ),
        ),
        (
            # The model's own state loads whole: the resumed losses are compared.
            "non_strict_unexpected",
            {"status": "ok", "entries": {}, "resume_losses": [1.0, 0.6]}
            | {"unexpected_entries": [UNEXPECTED_ENTRY]},
            (
                "fail",
                "resume: loss differs by 0.2 (relative) at resume step 1, above resume_rtol 1e-05",
            ),
        ),
    ],
)
def test_the_unexpected_entry_account(mode, load, expected):
    save, load = (
        SaveResult.from_dict({"reason": "", **ADDED}),
        LoadResult.from_dict({"reason": "", **load}),
    )
    assert records.verdict(save, load, 1e-5, mode) == expected


def test_check_2_reads_the_reference_in_the_loaders_form(tmp_path):
    weight = torch.arange(6.0).reshape(2, 3)
    saver_form = {"optim.state.w.exp_avg": weight, "optim.param_groups.0.lr": 0.01}
    saver_form["optim.param_groups.0.params"] = ["w"]
    loader_form = {"optim.state.w.exp_avg": weight, "optim.param_groups.w.lr": 0.01}
    Reference.write(str(tmp_path), saver_form, 0)
    Reference.write(load_form_dir(str(tmp_path)), loader_form, 0, beside=saver_form)
    assert sorted(Reference(str(tmp_path))) == sorted(saver_form)
    reference = Reference(str(tmp_path), load_form_dir(str(tmp_path)))
    assert sorted(reference) == sorted(loader_form)
    # The tensor's parts are read from the saver's own form, not written twice.
    assert "optim.state.w.exp_avg" not in Reference(load_form_dir(str(tmp_path))).pieces
    assert reference.compare("optim.state.w.exp_avg", weight).equal
    assert not reference.compare("optim.state.w.exp_avg", weight + 1).equal
    assert reference.compare("optim.param_groups.w.lr", 0.01).equal
    assert not reference.compare("optim.param_groups.w.lr", 0.02).equal


@pytest.mark.torchrun
def test_mode_pairs_across_ddp_and_fsdp2(in_tmp):
    rows = run_grid(
        {
            **DDP_TO_FSDP2,
            "mode": ["sharded", "full", "flattened_optim"],
            "load_mode": ["same", "sharded", "full"],
        }
    )
    by_id = {key[0]: row for key, row in rows.items()}
    for variant_id in ["", "mode-full", "mode-full+load_mode-sharded", "load_mode-full"]:
        row = by_id[variant_id]
        assert (variant_id, row["status"], row["reason"]) == (variant_id, "pass", "")
        assert row["entries_checked"] > 10 and row["entries_mismatched"] == 0
    assert by_id["load_mode-full"]["load_mode"] == "full"
    assert by_id["load_mode-full"]["mode"] == "sharded"
    # A finding about torch: flattened and unflattened optimizer state dicts are not
    # interchangeable (param_groups are named per parameter on one side, per group on the other).
    for variant_id in [
        "mode-flattened_optim+load_mode-sharded",
        "mode-flattened_optim+load_mode-full",
    ]:
        row = by_id[variant_id]
        assert row["status"] == "error", (variant_id, row["reason"])
        assert "Missing key in checkpoint state_dict: optim.param_groups.0.lr" in row["reason"]
    assert by_id["load_mode-sharded"]["status"] == "skip"
    assert by_id["load_mode-sharded"]["reason"] == (
        "save layout: load_mode sharded is mode sharded itself (load_mode same)"
    )


@pytest.mark.torchrun
def test_check_2_of_a_full_load_fails_when_an_entry_is_lost(in_tmp):
    cfg = {**DDP_TO_FSDP2, "mode": ["sharded", "full"], "load_mode": ["full", "sharded"]}
    rows = run_grid_with_fault(cfg, "drop_loaded_entry")
    for variant_id in ["load_mode-full", "mode-full+load_mode-sharded"]:
        row = rows[variant_id]
        assert row["status"] == "fail", (variant_id, row["reason"])
        assert row["reason"].startswith("loader vs saver: 1 of "), row["reason"]
        assert row["reason"].endswith(f"first {FIRST}: missing in the loader's state")


def run_grid_with_fault(cfg: dict, fault: str) -> dict[str, dict]:
    """The one cell of every variant of ``cfg`` (DDP_TO_FSDP2), ``fault`` injected into its
    load: {variant id: row}."""
    return {key[0]: row for key, row in run_grid(cfg, load_fault=fault).items()}


@pytest.mark.torchrun
def test_unexpected_entry_strict_and_non_strict(in_tmp):
    cfg = {**DDP_TO_FSDP2, "mode": ["strict_unexpected", "non_strict_unexpected"]}
    rows = {key[0]: row for key, row in run_grid(cfg).items()}
    strict, lenient = rows["mode-strict_unexpected"], rows["mode-non_strict_unexpected"]
    assert (strict["status"], strict["reason"]) == ("pass", ""), strict["reason"]
    assert strict["resume_max_rel_diff"] is None
    assert (lenient["status"], lenient["reason"]) == ("pass", ""), lenient["reason"]
    assert lenient["unexpected_entries"] == UNEXPECTED_ENTRY
    assert lenient["missing_entries"] is None and lenient["resume_max_rel_diff"] is not None
    # The saver wrote it: checks 0 and 1 compared it with the reference.
    assert lenient["files_entries_mismatched"] == 0 and lenient["entries_checked"] > 10


@pytest.mark.torchrun
def test_a_loader_that_ignores_the_unexpected_entry_fails_both_ways(in_tmp):
    assert faults.MODE_FAULTS["ignore_unexpected"] == "fail"
    cfg = {**DDP_TO_FSDP2, "mode": ["strict_unexpected", "non_strict_unexpected"]}
    rows = run_grid_with_fault(cfg, "ignore_unexpected")
    assert (rows["mode-strict_unexpected"]["status"], rows["mode-strict_unexpected"]["reason"]) == (
        "fail",
        f"strict load: a checkpoint with {UNEXPECTED_ENTRY} loaded without an error",
    )
    lenient = rows["mode-non_strict_unexpected"]
    assert (lenient["status"], lenient["reason"]) == (
        "fail",
        f"non-strict load: reported unexpected [], the saver added [{UNEXPECTED_ENTRY}]",
    )


def test_the_reproducer_replays_every_mode_pair(tmp_path, small_config):
    """A reproducer runs the pipeline's own jobs (pipeline_lib.results.reproducer): a load_mode, a mode
    that adds an entry, a save sequence are in its script as in the pipeline."""
    rows = []
    for variant in (
        Variant(mode="full", load_mode="flattened_optim"),
        Variant(mode="strict_unexpected"),
        Variant(save_sequence="load_first"),
    ):
        rows.append({"model": "mlp", "save_layout": "single", "load_layout": "fsdp2_2"})
        rows[-1] |= {**variant.to_dict(), "status": "error", "reason": "KeyError"}
    written = reproducer.write_all(pd.DataFrame(rows), config.validate(small_config), tmp_path)
    assert len(written) == len(rows)
    for folder, row in zip(written, rows, strict=True):
        assert f"'load_mode': {row['load_mode']!r}" in (folder / "repro.py").read_text()
