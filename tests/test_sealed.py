"""Sealed mode (verify.reference: sealed): the seal names a changed, missing, extra or
mis-sealed file; the files are read back by part and compared bit for bit; the fault campaign in
sealed mode catches every checkpoint fault and every fault that breaks the seal, naming the
file, while a clean cell passes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from pipeline_lib.plan import config, grid
from pipeline_lib.verify import faults, records, seal_file
from pipeline_lib.verify.results import LoadRecord, LoadResult, SaveRecord, SaveResult
from tests.conftest import REPO
from tests.record_schemas import read_checked
from tests.test_snakemake import snakemake


@pytest.fixture
def sealed_dir(tmp_path):
    folder = tmp_path / "checkpoint"
    (folder / "sub").mkdir(parents=True)
    (folder / ".metadata").write_bytes(b"m" * 100)
    (folder / "__0_0.distcp").write_bytes(bytes(range(256)) * 40)
    (folder / "sub" / "x").write_bytes(b"")
    seal_file.write(str(folder))
    return folder


def test_an_intact_checkpoint_keeps_its_seal_beside_it(sealed_dir):
    assert seal_file.check(str(sealed_dir)) == ""
    assert (sealed_dir.parent / "checkpoint.seal.json").exists()
    assert not any(p.name.endswith(".seal.json") for p in sealed_dir.rglob("*"))
    files = json.loads((sealed_dir.parent / "checkpoint.seal.json").read_text())["files"]
    assert sorted(files) == [".metadata", "__0_0.distcp", "sub/x"]


def test_a_changed_byte_names_the_file(sealed_dir):
    path = sealed_dir / "__0_0.distcp"
    data = bytearray(path.read_bytes())
    data[5000] ^= 1  # same size: only the digest sees it
    path.write_bytes(bytes(data))
    assert seal_file.check(str(sealed_dir)).startswith(
        "seal: __0_0.distcp changed since the save (xxh3_128 "
    )


def test_the_ranks_digest_shares_of_the_files(sealed_dir):
    path = sealed_dir / "__0_0.distcp"
    path.write_bytes(path.read_bytes()[::-1])
    reasons = [seal_file.check(str(sealed_dir), (i, 2)) for i in range(2)]
    assert sorted(reasons)[0] == "" and "__0_0.distcp changed" in sorted(reasons)[1]
    halves = [seal_file.make(str(sealed_dir), (i, 2)).files for i in range(2)]
    assert {**halves[0], **halves[1]} == seal_file.make(str(sealed_dir)).files


def test_a_truncated_deleted_or_added_file_is_named(sealed_dir):
    (sealed_dir / ".metadata").write_bytes(b"m" * 99)
    assert seal_file.check(str(sealed_dir)) == (
        "seal: .metadata changed since the save (99 bytes, sealed 100)"
    )
    (sealed_dir / ".metadata").unlink()
    assert seal_file.check(str(sealed_dir)) == (
        f"seal: sealed file .metadata is missing from {sealed_dir}"
    )
    seal_file.write(str(sealed_dir))
    (sealed_dir / "__1_0.distcp").write_bytes(b"new")
    assert seal_file.check(str(sealed_dir)) == (
        f"seal: file __1_0.distcp in {sealed_dir} is not in the seal"
    )


def test_a_seal_that_does_not_match_or_is_missing_fails(sealed_dir):
    assert (
        faults.corrupt_seal(sealed_dir) == "changed the digest of .metadata in checkpoint.seal.json"
    )
    assert seal_file.check(str(sealed_dir)).startswith("seal: .metadata changed since the save")
    (sealed_dir.parent / "checkpoint.seal.json").write_text("{")
    assert "checkpoint.seal.json unreadable: JSONDecodeError" in seal_file.check(str(sealed_dir))
    (sealed_dir.parent / "checkpoint.seal.json").unlink()
    assert seal_file.check(str(sealed_dir)) == f"seal: no seal at {sealed_dir}.seal.json"


def test_a_single_file_checkpoint_is_sealed_too(tmp_path):
    path = tmp_path / "full_state.pt"
    path.write_bytes(b"abc")
    seal_file.write(str(path))
    assert seal_file.check(str(path)) == ""
    path.write_bytes(b"abd")
    assert seal_file.check(str(path)).startswith("seal: full_state.pt changed since the save")


def test_files_are_read_by_part_and_compared_bit_for_bit(tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp

    from pipeline_lib.verify.entries import FlatPiece
    from pipeline_lib.verify.sealed_mode import Files

    w, b = torch.randn(7, 5), torch.randn(5)
    state = {"model.w": w, "model.b": b, "optim.param_groups.0.lr": 0.1}
    dcp.save(state, checkpoint_id=str(tmp_path / "c"), no_dist=True)
    files = Files(str(tmp_path / "c"))
    run = FlatPiece(8, w.reshape(-1)[8:23].clone(), w.shape)  # rows 1-4, partly
    found = files.compare_many({**state, "model.w": run})
    assert all(c.equal for c in found.values()), found
    run.data[3] += 1
    wrong = {"model.w": run, "model.b": b.double(), "optim.param_groups.0.lr": 0.2}
    found = files.compare_many(wrong)
    assert found["model.w"].note == "bytes differ"
    assert found["model.b"].note == "dtype torch.float32 != torch.float64"
    assert found["optim.param_groups.0.lr"].note == "value 0.1 != 0.2"
    assert files.compare_many({"model.b": b[:4]}, False)["model.b"].note == "shape [4] != [5]"
    # Check 2 compares two states of the loader: the parts read for the first serve the second.
    files.keep = True
    assert files.compare_many({"model.w": run})["model.w"].note == "bytes differ"
    files.keep = False
    good = FlatPiece(8, w.reshape(-1)[8:23].clone(), w.shape)
    assert files.compare_many({"model.w": good})["model.w"].equal and not files._kept


def test_a_broken_seal_fails_the_cell_whatever_else_held():
    save = SaveResult(status="ok", reason="", state_check={}, files_check={}, resume_losses=[1.0])
    broken = "seal: .metadata changed since …"
    load = LoadResult(status="ok", reason="", seal_ok=False, seal_error=broken)
    assert records.verdict(save, load, 1e-5) == ("fail", "seal: .metadata changed since …")


def test_faults_that_break_a_seal_need_sealed_mode(small_config):
    small_config["faults"] = [{"fault": "corrupt_seal", "model": "mlp", "save": "single",
                               "load": "fsdp2_2"}]  # fmt: skip
    with pytest.raises(config.ConfigError, match=r"faults.0.fault: corrupt_seal breaks a seal"):
        config.validate(small_config)
    small_config["verify"] = {"reference": "sealed"}
    small_config["faults"][0]["fault"] = "all"
    cells = grid.fault_cells(config.validate(small_config))
    sequence = {name for name, f in faults.FAULTS.items() if f.stage == "sequence"}
    assert sequence and {c.fault for c in cells} == set(faults.FAULTS) - sequence


FILES = re.escape("files vs saver: 1 of 52 entries differ; first model.blocks.0.fc1.bias")
SHARD = r"(__\d+_\d+\.distcp)"
SEALED_REASONS = {
    "flip_byte": f"{FILES}: bytes differ",
    "truncate_shard": "files vs saver: ",
    "delete_shard": "files vs saver: ",
    "delete_metadata": "files vs saver: cannot read checkpoint results/faults/delete_metadata",
    "drop_entry": f"{FILES}: missing in the checkpoint",
    "change_shape": f"{FILES}: shape \\[32\\] != \\[33\\]",
    "change_dtype": f"{FILES}: dtype torch.float32 != torch.float64",
    # Files changed between the jobs: check 1 held, the load job's seal check names the file
    # the fault changed (its account in the save record).
    "change_after_seal": f"seal: {SHARD} changed since the save \\(xxh3_128 [0-9a-f]{{32}}, sealed ",
    "delete_after_seal": f"seal: sealed file {SHARD} is missing from results/faults/",
    "corrupt_seal": "seal: (\\.metadata) changed since the save \\(xxh3_128 [0-9a-f]{32}, sealed ",
}


@pytest.mark.e2e
def test_sealed_fault_campaign(tmp_path):
    (tmp_path / "config.yaml").write_text((REPO / "configs" / "selftest-sealed.yaml").read_text())
    snakemake(tmp_path)
    assert_sealed_campaign(tmp_path)


def assert_sealed_campaign(run: Path) -> None:
    table = pd.read_parquet(run / "results" / "selftest.parquet").set_index("fault")
    checkpoint_faults = {n for n, f in faults.FAULTS.items() if f.stage == "checkpoint"}
    assert set(table.index) == set(SEALED_REASONS) >= checkpoint_faults
    for fault, row in table.iterrows():
        assert (row.status, row.reference_mode) == ("fail", "sealed"), (fault, row.reason)
        found = re.match(SEALED_REASONS[fault], row.reason)
        assert found and row.caught, (fault, row.reason)
        if faults.FAULTS[fault].stage == "sealed":
            cell = grid.FaultCell(fault, "mlp", "ddp_2", "fsdp2_2")
            save = read_checked(run / grid.save_record_path("mlp", "ddp_2", cell.root), SaveRecord)
            assert (save.status, save.files_check[ENTRY].equal) == ("ok", True)
            assert found.group(1) in save.fault_applied, (fault, save.fault_applied)
    # The clean cell: no reference written, the seal beside the checkpoint, and it passes.
    save_dir = run / grid.save_dir("mlp", "fsdp1_2")
    assert not (save_dir / "reference").exists() and (save_dir / "checkpoint.seal.json").exists()
    (cell,) = read_checked(run / grid.load_record_path("mlp", "fsdp2_2"), LoadRecord).cells
    assert (cell["status"], cell["reference_mode"], cell["seal_ok"]) == ("pass", "sealed", True)
    assert cell["entries_checked"] == 52 and cell["seal_seconds"] is not None


ENTRY = "model.blocks.0.fc1.bias"
