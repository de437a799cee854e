"""The checks' mapped reader of a DCP folder (pipeline_lib.verify.mapped_reader): the same values as DCP's own
read, a changed byte seen, and every case it does not map left to DCP's read."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")

from torch.distributed.checkpoint.metadata import (  # noqa: E402
    ChunkStorageMetadata,
    TensorProperties,
    TensorStorageMetadata,
)

from pipeline_lib.verify import mapped_reader  # noqa: E402
from pipeline_lib.verify.readers import checkpoint_entries  # noqa: E402
from pipeline_lib.verify.untrusted import SafeFileSystemReader  # noqa: E402


def _save(path, state) -> object:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(path), no_dist=True)
    return SafeFileSystemReader(str(path)).read_metadata()


@pytest.fixture
def saved(tmp_path):
    state = {
        "w": torch.randn(6, 5),
        "t": torch.randn(4, 3).t(),  # saved as a transposed view: strides of its own
        "h": torch.randn(9, dtype=torch.float64).to(torch.bfloat16),
        "s": torch.tensor(3.5),
        "e": torch.empty(0, 4),
        "lr": 0.1,
    }
    return tmp_path / "c", state, _save(tmp_path / "c", state)


def _parts(folder, metadata, name):
    with mapped_reader.open_parts(str(folder), metadata, name) as parts:
        assert parts is not None, name
        return [(p.offsets, p.data.clone()) for p in parts]


def test_mapped_chunks_hold_what_dcp_reads(saved):
    folder, _, metadata = saved
    read = dict(checkpoint_entries(str(folder)))
    for name in ("w", "t", "h", "s", "e"):
        ((offsets, data),) = _parts(folder, metadata, name)
        assert offsets == (0,) * data.dim()
        assert data.dtype == read[name].dtype and data.shape == read[name].shape
        assert torch.equal(
            data.reshape(-1).view(torch.uint8), read[name].reshape(-1).view(torch.uint8)
        )
    with mapped_reader.open_parts(str(folder), metadata, "lr") as parts:
        assert parts is None  # a value: DCP reads it


def _data_offset(folder, metadata, name) -> tuple:
    """(file, offset) of the first data byte of entry ``name``'s one chunk."""
    import io
    import zipfile

    info = metadata.storage_data[next(i for i in metadata.storage_data if i.fqn == name)]
    path = folder / info.relative_path
    blob = path.read_bytes()[info.offset : info.offset + info.length]
    record = next(i for i in zipfile.ZipFile(io.BytesIO(blob)).infolist() if "/data/" in i.filename)
    header = blob[record.header_offset :]
    start = record.header_offset + 30 + int.from_bytes(header[26:28], "little")
    return path, info.offset + start + int.from_bytes(header[28:30], "little")


def test_a_changed_byte_of_the_data_is_seen(saved):
    from pipeline_lib.verify.sealed_mode import Files

    folder, state, metadata = saved
    path, at = _data_offset(folder, metadata, "w")
    raw = bytearray(path.read_bytes())
    raw[at + 7] ^= 0x10
    path.write_bytes(bytes(raw))
    found = Files(str(folder)).compare_many({"w": state["w"], "t": state["t"]})
    assert found["w"].note == "bytes differ" and found["t"].equal


def _not_mapped(folder, metadata, name) -> bool:
    with mapped_reader.open_parts(str(folder), metadata, name) as parts:
        return parts is None


def test_a_damaged_archive_is_left_to_dcp(saved):
    folder, _, metadata = saved
    path, at = _data_offset(folder, metadata, "w")
    raw = bytearray(path.read_bytes())
    info = metadata.storage_data[next(i for i in metadata.storage_data if i.fqn == "w")]
    raw[info.offset : info.offset + 4] = b"XXXX"  # the record's local header signature
    path.write_bytes(bytes(raw))
    assert _not_mapped(folder, metadata, "w")
    path.write_bytes(bytes(raw[: at + 10]))  # cut inside the data
    assert _not_mapped(folder, metadata, "w")


def test_a_path_outside_the_folder_is_left_to_dcp(saved, tmp_path):
    import dataclasses

    folder, _, metadata = saved
    index = next(i for i in metadata.storage_data if i.fqn == "w")
    info = metadata.storage_data[index]
    outside = tmp_path / "outside"
    outside.write_bytes((folder / info.relative_path).read_bytes())
    metadata.storage_data[index] = dataclasses.replace(info, relative_path="../outside")
    assert _not_mapped(folder, metadata, "w")


def test_chunks_that_do_not_tile_the_entry_are_left_to_dcp():
    def entry(*boxes):
        chunks = [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in boxes]
        return TensorStorageMetadata(TensorProperties(torch.float32), torch.Size([4, 4]), chunks)

    assert mapped_reader.tiles(entry(((0, 0), (2, 4)), ((2, 0), (2, 4))))
    assert not mapped_reader.tiles(entry(((0, 0), (2, 4))))  # a gap
    assert not mapped_reader.tiles(entry(((0, 0), (3, 4)), ((2, 0), (1, 4))))  # an overlap
    assert not mapped_reader.tiles(entry(((0, 0), (2, 4)), ((3, 0), (2, 4))))  # outside the entry
    scalar = TensorStorageMetadata(
        TensorProperties(torch.float32),
        torch.Size([]),
        [ChunkStorageMetadata(torch.Size([]), torch.Size([]))],
    )
    assert mapped_reader.tiles(scalar)


def test_check_1_compares_mapped_chunks_and_still_fails_on_a_change(saved, tmp_path):
    """Exact mode's files check reads mapped chunks (no dcp.load of a tensor entry) and a
    changed byte in them still fails the entry."""
    from pipeline_lib.verify import checks
    from pipeline_lib.verify.reference import Reference

    folder, state, metadata = saved
    Reference.write(str(tmp_path / "ref"), state, 0)
    reference = Reference(str(tmp_path / "ref"))
    entries = {}
    compared = checks._mapped_vs(str(folder), reference, entries)
    assert all(compared(n) for n in ("w", "t", "h", "s", "e")) and not compared("lr")
    assert all(e.equal for e in entries.values()), entries
    path, at = _data_offset(folder, metadata, "h")
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))
    assert compared("h") and entries["h"].note == "bytes differ"


def test_a_full_state_file_is_compared_through_torch_loads_own_mapping(tmp_path):
    """Files of a full-state file (torch.save) compare through torch.load's own mapping."""
    from pipeline_lib.verify.sealed_mode import Files

    state = {"model": {"w": torch.randn(4, 3)}, "optim": {"lr": 0.1}}
    torch.save(state, tmp_path / "full.pt")
    files = Files(str(tmp_path / "full.pt"), full=True)
    assert not files.mappable
    found = files.compare_many({"model.w": state["model"]["w"], "optim.lr": 0.1})
    assert all(c.equal for c in found.values()), found
    changed = state["model"]["w"].clone()
    changed[1, 2] += 1
    assert files.compare_many({"model.w": changed})["model.w"].note == "bytes differ"
