"""What docs/untrusted-checkpoints.md promises. A checkpoint from elsewhere
(a foreign or tampered ``.metadata``, a non-tensor entry, a torch.save file) is refused with a
clear error and never runs code; a record on disk cannot point the loader at another folder."""

from __future__ import annotations

import contextlib
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

from pipeline_lib.common.errors import one_line
from pipeline_lib.job import checkpoint_io, driver
from pipeline_lib.plan import config, grid
from pipeline_lib.plan.axes import DEFAULT, Variant
from pipeline_lib.plan.specs import CheckpointPaths
from pipeline_lib.verify import faults
from pipeline_lib.verify.readers import checkpoint_entries
from pipeline_lib.verify.results import ImportRecord, LoadRecord, SaveRecord
from tests.record_schemas import read_checked


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
    from pipeline_lib.verify.untrusted import load_metadata

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
            __import__("pipeline_lib.verify.untrusted")
            .verify.untrusted.SafeFileSystemReader(str(c))
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
    # pipeline_lib.verify.untrusted.UntrustedPickle
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
    from pipeline_lib.verify.untrusted import OutsideFolder, SafeFileSystemReader

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
    record = SaveRecord(
        status="ok", reason="", files_check={}, model="mlp", layout=source.layout,
        checkpoint=source.paths.checkpoint, reference="/elsewhere/reference", config_hash="x",
        created_at="2026-01-01T00:00:00Z", torch_version="2.13.0",
    )  # fmt: skip
    Path(source.save_record).parent.mkdir(parents=True)
    Path(source.save_record).write_text(json.dumps(record.to_dict()))
    launched = []
    real = driver.run_units
    monkeypatch.setattr(
        driver, "run_units", lambda s, w, p, *c: launched.append(p) or real(s, w, p, *c)
    )
    driver.run_load_job(spec)
    (cell,) = read_checked(spec.items[0].record, LoadRecord).cells
    assert cell["status"] == "error"
    assert "names another reference ('/elsewhere/reference', expected " in cell["reason"]
    assert launched == [[]]  # nothing to run


@pytest.mark.parametrize(
    ("text", "named"),
    [("{not json", "JSONDecodeError"), ('{"status": "ok"}', "reason"), ("[1, 2]", "")],
)
def test_an_unreadable_save_record_is_an_error_cell_and_the_others_go_on(
    in_tmp, monkeypatch, text, named
):
    """A save record edited under results/ (not JSON, a key missing, another form) makes its
    cells errors naming the file; the job's other source still runs and writes its cell."""
    layouts = {"single": {"framework": "single", "mesh": [1]},
               "single_b": {"framework": "single", "mesh": [1]}}  # fmt: skip
    cfg = config.validate({"models": ["mlp"], "layouts": layouts})
    spec = grid.load_job_spec(cfg, "results", "single")
    sources = {s.layout.name: s for s in spec.items[0].sources}
    good = sources["single_b"]
    record = SaveRecord(
        status="error", reason="the save failed", model="mlp", layout=good.layout,
        checkpoint=good.paths.checkpoint, reference=good.paths.reference, config_hash="x",
        created_at="2026-01-01T00:00:00Z", torch_version="2.13.0",
    )  # fmt: skip
    for source, body in ((good, json.dumps(record.to_dict())), (sources["single"], text)):
        Path(source.save_record).parent.mkdir(parents=True, exist_ok=True)
        Path(source.save_record).write_text(body)
    launched = []
    real = driver.run_units
    monkeypatch.setattr(
        driver, "run_units", lambda s, w, p, *c: launched.append(p) or real(s, w, p, *c)
    )
    driver.run_load_job(spec)
    assert launched == [[]]  # nothing to run
    cells = {c["save_layout"]: c for c in read_checked(spec.items[0].record, LoadRecord).cells}
    assert (cells["single_b"]["status"], cells["single_b"]["reason"]) == (
        "error", "save: the save failed"
    )  # fmt: skip
    bad = cells["single"]
    assert bad["status"] == "error"
    path = sources["single"].save_record
    assert bad["reason"].startswith(f"save: the record {path} cannot be read"), bad["reason"]
    assert named in bad["reason"] and "\n" not in bad["reason"]


# --- what a checkpoint folder can make the reader run, block on or allocate ----------------------


def finishes(read, seconds: float = 30.0, unblock: Path | None = None):
    """``read()`` in a thread: (finished within ``seconds``, what it returned or raised). A
    reader blocked on the FIFO ``unblock`` is released afterwards (its writer opens and closes)."""
    import threading

    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(_call(read)), daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive() and unblock is not None:
        with contextlib.suppress(OSError):
            os.close(os.open(unblock, os.O_WRONLY | os.O_NONBLOCK))
    return not thread.is_alive(), outcome[0] if outcome else None


def _call(read):
    try:
        return read()
    except BaseException as exc:
        return exc


@pytest.mark.parametrize("special", ["data", ".metadata"])
def test_a_fifo_in_the_folder_is_refused_without_blocking(checkpoint, special):
    fifo = checkpoint / ("__0_0.distcp" if special == "data" else ".metadata")
    if special == ".metadata":
        (checkpoint / "real.metadata").write_bytes(fifo.read_bytes())
    fifo.unlink()
    os.mkfifo(fifo)
    done, outcome = finishes(lambda: dict(checkpoint_entries(str(checkpoint))), unblock=fifo)
    assert done, "the reader blocked on a FIFO"
    assert isinstance(outcome, ValueError) and "not a regular file (a FIFO)" in str(outcome)


def test_a_metadata_link_out_of_the_folder_is_refused(checkpoint, tmp_path):
    from pipeline_lib.job.existing import metadata_sha256
    from pipeline_lib.verify.untrusted import OutsideFolder, SafeFileSystemReader

    (tmp_path / "elsewhere.metadata").write_bytes((checkpoint / ".metadata").read_bytes())
    (checkpoint / ".metadata").unlink()
    (checkpoint / ".metadata").symlink_to(tmp_path / "elsewhere.metadata")
    for read in (lambda: SafeFileSystemReader(str(checkpoint)).read_metadata(),
                 lambda: dict(checkpoint_entries(str(checkpoint))),
                 lambda: metadata_sha256(str(checkpoint))):  # fmt: skip
        with pytest.raises(OutsideFolder, match=r"\.metadata: refused: a link to .*elsewhere"):
            read()


def rewrite(checkpoint: Path, edit) -> None:
    """``edit(metadata)`` applied to the checkpoint's .metadata, pickled back by hand."""
    metadata = pickle.loads((checkpoint / ".metadata").read_bytes())
    edit(metadata)
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))


def test_entries_without_data_are_named_before_any_read_and_metadata_is_unpickled_once(
    checkpoint, monkeypatch
):
    """A .metadata of many entries with no data in the files: each is an error at once, and the
    metadata is unpickled once (it was once per dcp.load: once per entry after a failed batch)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from pipeline_lib.verify import untrusted

    def add(metadata):
        for i in range(40):
            metadata.state_dict_metadata[f"ghost.{i}\n\x1b[31m"] = BytesStorageMetadata()

    rewrite(checkpoint, add)
    unpickled, reads, real_load = [], [], dcp.load
    monkeypatch.setattr(untrusted, "load_metadata", lambda s, w: unpickled.append(w) or
                        untrusted._MetadataUnpickler(s).load())  # fmt: skip
    monkeypatch.setattr(dcp, "load", lambda *a, **k: reads.append(1) or real_load(*a, **k))
    found = dict(checkpoint_entries(str(checkpoint)))
    assert len(unpickled) == 1 and len(reads) == 1, (len(unpickled), len(reads))
    ghosts = [v for n, v in found.items() if n.startswith("ghost.")]
    assert len(ghosts) == 40 and all(isinstance(v, untrusted.UnsafeFile) for v in ghosts)
    assert "ghost.0\\n\\x1b[31m: no data in the checkpoint's files" in str(ghosts[0])
    assert torch.equal(found["model.b"], state()["model"]["b"])


def test_a_failing_batch_is_split_in_halves(checkpoint, monkeypatch):
    """One unreadable entry among many: found in about 2 log2(n) reads, not one read per entry."""
    import dataclasses

    def add(metadata):
        index, info = next((i, v) for i, v in metadata.storage_data.items() if i.fqn == "model.w")
        for i in range(63):
            name = f"copy.{i:02d}"
            metadata.state_dict_metadata[name] = metadata.state_dict_metadata["model.w"]
            broken = dataclasses.replace(info, length=info.length - (i == 40))
            metadata.storage_data[dataclasses.replace(index, fqn=name)] = broken

    rewrite(checkpoint, add)
    reads, real_load = [], dcp.load
    monkeypatch.setattr(dcp, "load", lambda *a, **k: reads.append(1) or real_load(*a, **k))
    found = dict(checkpoint_entries(str(checkpoint)))
    failed = [name for name, value in found.items() if isinstance(value, BaseException)]
    assert failed == ["copy.40"] and len(found) == 63 + 5
    assert len(reads) <= 2 * 7 + 1, len(reads)


def declared(checkpoint: Path, entry: str, **change) -> None:
    """Declare ``entry``'s storage otherwise (offset, length) in .metadata."""
    import dataclasses

    def edit(metadata):
        index = next(i for i in metadata.storage_data if i.fqn == entry)
        metadata.storage_data[index] = dataclasses.replace(metadata.storage_data[index], **change)

    rewrite(checkpoint, edit)


@pytest.mark.parametrize(
    ("entry", "change", "expected"),
    [
        ("model.w", {"offset": -7}, r"entry model\.w: stored at bytes -7\.\."),
        ("model.w", {"length": 10**12}, r"entry model\.w: stored at bytes \d+\.\.\d+ of '__0_0\.distcp', which holds \d+ bytes"),
        ("model.w", {"size": [10**6, 2]}, r"entry model\.w: declares 7\.6 MiB of tensor data, its chunks in the files hold 1\.\d KiB"),
        ("optim.param_groups.0.lr", {"sparse": 2**28}, r"entry optim\.param_groups\.0\.lr: a non-tensor entry of 256\.0 MiB, more than the 64\.0 MiB one is read up to"),
        ("model.w", {"transform_descriptors": ["stream.zstd/1"]}, r"entry model\.w is read through \['stream\.zstd/1'\] \(a stream transform"),
    ],
)  # fmt: skip
def test_declared_sizes_are_checked_against_the_files_before_reading(
    checkpoint, entry, change, expected
):
    """What .metadata declares, far from what the files hold: refused before anything is read
    or allocated (a bytes entry of 256 MiB over a sparse file was read whole)."""
    import tracemalloc

    if "size" in change:

        def edit(metadata):
            metadata.state_dict_metadata[entry].size = torch.Size(change["size"])

        rewrite(checkpoint, edit)
    elif "sparse" in change:
        shard = checkpoint / "__0_0.distcp"
        with open(shard, "r+b") as f:
            f.truncate(change["sparse"])  # a hole: zeros, no disk
        offset = pickle.loads((checkpoint / ".metadata").read_bytes())
        start = next(v.offset for i, v in offset.storage_data.items() if i.fqn == entry)
        declared(checkpoint, entry, length=change["sparse"] - start)
    else:
        declared(checkpoint, entry, **change)
    tracemalloc.start()
    try:
        found = dict(checkpoint_entries(str(checkpoint)))[entry]
    except (Exception, CheckpointException) as exc:  # the transform: the whole checkpoint
        found = exc
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert isinstance(found, ValueError) and re.search(expected, str(found)), found
    assert peak < 16 * 2**20, peak


def sparse_metadata(checkpoint: Path, size: int) -> None:
    """The checkpoint's real .metadata followed by a hole up to ``size`` bytes."""
    with open(checkpoint / ".metadata", "r+b") as f:
        f.truncate(size)


def test_metadata_is_hashed_in_blocks_and_refused_above_its_bound(checkpoint):
    import hashlib
    import tracemalloc

    from pipeline_lib.job.existing import metadata_sha256

    sparse_metadata(checkpoint, 300 * 2**20)
    tracemalloc.start()
    digest = metadata_sha256(str(checkpoint))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    expected = hashlib.sha256()
    with open(checkpoint / ".metadata", "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            expected.update(block)
    assert digest == expected.hexdigest() and peak < 8 * 2**20, peak
    sparse_metadata(checkpoint, 5 * 2**30 // 4)
    with pytest.raises(ValueError, match=r"refused: 1\.2 GiB, more than the 1\.0 GiB read of one"):
        metadata_sha256(str(checkpoint))
    with pytest.raises(ValueError, match=r"refused: 1\.2 GiB, more than the 1\.0 GiB"):
        dict(checkpoint_entries(str(checkpoint)))


def test_a_pickled_object_larger_than_metadata_holds_is_refused_before_it_is_read(tmp_path):
    """A pickle declaring one object of 1 GiB (BINBYTES8) in a file of a few bytes: the unpickler
    reserves it (untouched), its read is refused."""
    import struct

    from pipeline_lib.verify.untrusted import UntrustedPickle, load_metadata

    path = tmp_path / ".metadata"
    path.write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", 2**30) + b"\x00" * 16)
    with (
        open(path, "rb") as f,
        pytest.raises(UntrustedPickle, match=r"refused to read an object of 1024\.0 MiB \(more"),
    ):
        load_metadata(f, str(path))


def existing_spec(path: Path, naming: str):
    from pipeline_lib.plan.specs import ExistingSpec

    return ExistingSpec(
        name="theirs", path=str(path), model="mlp", naming=naming,
        save_dir="results/existing/theirs", reference="results/existing/theirs/reference",
        record="results/existing/theirs.json", config_hash="x",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("naming", "command", "why"),
    [
        ("os:system", "/usr/bin/touch PWNED", "'os' is part of Python, not your own module"),
        ("builtins:eval", "open('PWNED', 'w')", "'builtins' is part of Python"),
        ("shutil:rmtree", "kept", "'shutil' (/"),
    ],
)
def test_an_entry_named_like_a_command_never_runs(in_tmp, naming, command, why):
    """A naming that is no function of the user's own, named past the config check (the import
    job checks it again): the entry named like a command is never passed to it."""
    from pipeline_lib.job.existing import import_checkpoint

    (in_tmp / "kept").mkdir()
    checkpoint = in_tmp / "theirs"
    save(checkpoint, {"model": {"w": torch.ones(2)}, "optim": {"x": torch.ones(1)}})

    def rename(metadata):
        import dataclasses

        metadata.state_dict_metadata[command] = metadata.state_dict_metadata.pop("model.w")
        index = next(i for i in metadata.storage_data if i.fqn == "model.w")
        metadata.storage_data[dataclasses.replace(index, fqn=command)] = metadata.storage_data.pop(
            index
        )

    rewrite(checkpoint, rename)
    spec = existing_spec(checkpoint, naming)
    import_checkpoint(spec)
    assert not (in_tmp / "PWNED").exists() and (in_tmp / "kept").is_dir()
    record = read_checked(spec.record, ImportRecord)
    assert record.status == "error" and why in record.reason, record.reason
