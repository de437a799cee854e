"""Issue 14, item 10: what docs/untrusted-checkpoints.md promises. A checkpoint from elsewhere
(a foreign or tampered ``.metadata``, a non-tensor entry, a torch.save file) is refused with a
clear error and never runs code; a record on disk cannot point the loader at another folder."""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException

from pipeline_lib import checkpoint_io, config, driver, faults, grid
from pipeline_lib.axes import DEFAULT, Variant
from pipeline_lib.errors import one_line
from pipeline_lib.readers import checkpoint_entries
from pipeline_lib.specs import CheckpointPaths


class RunsCode:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def save(path: Path, state: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=str(path), no_dist=True)


def state() -> dict:
    return {
        "model": {"w": torch.randn(3, 2), "b": torch.zeros(2, dtype=torch.bfloat16)},
        "optim": {"param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": ["w"]}]},
    }


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    path = tmp_path / "checkpoint"
    save(path, state())
    return path


def tamper(checkpoint: Path, marker: Path) -> None:
    """Make .metadata a pickle that runs code, as a foreign checkpoint could."""
    metadata = pickle.loads((checkpoint / ".metadata").read_bytes())
    metadata.planner_data = RunsCode(marker)
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))


def test_a_real_metadata_loads(checkpoint):
    from pipeline_lib.untrusted import load_metadata

    with open(checkpoint / ".metadata", "rb") as f:
        metadata = load_metadata(f)
    assert metadata == pickle.loads((checkpoint / ".metadata").read_bytes())
    assert dict(checkpoint_entries(str(checkpoint)))["model.w"].shape == (3, 2)


def test_the_tampered_pickle_does_run_code_with_pickle(checkpoint, tmp_path):
    """The test's own premise: plain pickle.load (FileSystemReader's) runs the command."""
    marker = tmp_path / "ran"
    tamper(checkpoint, marker)
    dcp.FileSystemReader(str(checkpoint)).read_metadata()
    assert marker.exists()


def paths(checkpoint, full_state) -> CheckpointPaths:
    return CheckpointPaths(str(checkpoint), str(full_state), "unused-reference")


@pytest.mark.parametrize(
    "read",
    [
        lambda c: (
            __import__("pipeline_lib.untrusted")
            .untrusted.SafeFileSystemReader(str(c))
            .read_metadata()
        ),
        lambda c: dict(checkpoint_entries(str(c))),
        lambda c: faults._metadata(c),
        lambda c: checkpoint_io._reader(DEFAULT, paths(c, c / "full.pt")).read_metadata(),
    ],
    ids=["reader", "files_check", "faults", "loader"],
)
def test_a_metadata_that_would_run_code_is_refused(checkpoint, tmp_path, read):
    marker = tmp_path / "ran"
    tamper(checkpoint, marker)
    # pipeline_lib.untrusted.UntrustedPickle
    with pytest.raises(
        pickle.UnpicklingError, match=r"\.metadata: refused to unpickle posix\.system"
    ):
        read(checkpoint)
    assert not marker.exists()


def place_outside(checkpoint: Path, target: str, other: Path) -> None:
    """Make .metadata read entry model.w from ``target``: a copy of the file that holds it
    in ``other``, a checkpoint of the same layout with other values."""
    import dataclasses

    metadata = pickle.loads((checkpoint / ".metadata").read_bytes())
    index = next(i for i in metadata.storage_data if i.fqn == "model.w")
    info = metadata.storage_data[index]
    (checkpoint / target).resolve().write_bytes((other / info.relative_path).read_bytes())
    metadata.storage_data[index] = dataclasses.replace(info, relative_path=target)
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))


@pytest.mark.parametrize("where", ["../outside.distcp", "absolute"])
def test_a_metadata_that_reads_outside_its_folder_is_refused(checkpoint, tmp_path, where):
    """DCP's FileSystemReader reads a file outside the folder when .metadata says so (the
    premise, torch 2.13); every reader of this tool refuses it, naming the entry."""
    from pipeline_lib.untrusted import OutsideFolder, SafeFileSystemReader

    other = tmp_path / "other"
    sevens = state()
    sevens["model"]["w"] = torch.full((3, 2), 7.0)
    save(other, sevens)
    target = str(tmp_path / "elsewhere.distcp") if where == "absolute" else where
    place_outside(checkpoint, target, other)
    loaded = {"model": {"w": torch.empty(3, 2), "b": torch.empty(2, dtype=torch.bfloat16)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(loaded, storage_reader=dcp.FileSystemReader(str(checkpoint)), no_dist=True)
    assert torch.equal(loaded["model"]["w"], sevens["model"]["w"])  # read from outside
    message = rf"\.metadata: refused: entry model\.w is read from '{re.escape(target)}', outside"
    with pytest.raises(OutsideFolder, match=message):
        SafeFileSystemReader(str(checkpoint)).read_metadata()
    with pytest.raises(OutsideFolder, match=message):
        dict(checkpoint_entries(str(checkpoint)))
    with pytest.raises(OutsideFolder, match=message):
        checkpoint_io._reader(DEFAULT, paths(checkpoint, checkpoint / "full.pt")).read_metadata()
    with pytest.raises(OutsideFolder, match=message):  # it would delete the file it names
        faults._metadata(checkpoint)


def test_the_conversion_to_torch_save_refuses_an_entry_that_would_run_code(checkpoint, tmp_path):
    marker = tmp_path / "ran"
    save(checkpoint, {**state(), "extra": RunsCode(marker)})
    spec = paths(checkpoint, tmp_path / "full.pt")
    with pytest.raises(CheckpointException) as info:
        checkpoint_io.convert(Variant(format="torch_save"), spec)
    assert "UnpicklingError: Weights only load failed" in one_line(info.value)
    assert not marker.exists() and not Path(spec.full_state).exists()


def test_the_conversion_to_torch_save_keeps_every_entry(checkpoint, tmp_path):
    spec = paths(checkpoint, tmp_path / "full.pt")
    checkpoint_io.convert(Variant(format="torch_save"), spec)
    full = torch.load(spec.full_state, weights_only=True)
    assert torch.equal(full["model"]["w"], dict(checkpoint_entries(str(checkpoint)))["model.w"])
    assert full["optim"]["param_groups"][0]["betas"] == (0.9, 0.99)


def test_the_conversion_from_torch_save_refuses_a_file_that_would_run_code(tmp_path):
    marker = tmp_path / "ran"
    torch.save({**state(), "extra": RunsCode(marker)}, tmp_path / "full.pt")
    spec = paths(tmp_path / "checkpoint", tmp_path / "full.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        checkpoint_io.convert(Variant(format="torch_save_to_dcp"), spec)
    assert not marker.exists()
    torch.save(state(), tmp_path / "full.pt")
    checkpoint_io.convert(Variant(format="torch_save_to_dcp"), spec)
    assert sorted(dict(checkpoint_entries(spec.checkpoint))) == [
        "model.b", "model.w", "optim.param_groups.0.betas", "optim.param_groups.0.lr",
        "optim.param_groups.0.params",
    ]  # fmt: skip


def test_a_save_record_cannot_point_the_loader_at_another_reference(in_tmp, monkeypatch):
    cfg = config.validate({"models": ["mlp"], "layouts": {"single": {"framework": "single",
                                                                     "mesh": [1]}}})  # fmt: skip
    spec = grid.load_job_spec(cfg, "results", "single")
    (source,) = spec.items[0].sources
    assert source.paths.reference == "results/save/mlp/single/reference"
    record = {"status": "ok", "layout": spec.layout, "files_check": {},
              "checkpoint": source.paths.checkpoint, "reference": "/elsewhere/reference"}  # fmt: skip
    Path(source.save_record).parent.mkdir(parents=True)
    Path(source.save_record).write_text(json.dumps(record))
    launched = []
    real = driver.run_units
    monkeypatch.setattr(
        driver, "run_units", lambda s, w, p, *c: launched.append(p) or real(s, w, p, *c)
    )
    driver.run_load_job(spec)
    (cell,) = json.loads(Path(spec.items[0].record).read_text())["cells"]
    assert cell["status"] == "error"
    assert "names another reference ('/elsewhere/reference', expected " in cell["reason"]
    assert launched == [[]]  # nothing to run
