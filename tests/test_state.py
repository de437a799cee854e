"""Entries, the saver's reference, bit-exact comparison and offline readers (torch, single
process): pipeline_lib.verify.entries, reference, compare, readers."""

import pytest
import torch
import torch.distributed.checkpoint as dcp

from pipeline_lib.verify.bitwise import EntryComparison, compare, merge, shared_storage
from pipeline_lib.verify.entries import FlatPiece, entry_kind, flatten
from pipeline_lib.verify.readers import checkpoint_entries, shares
from pipeline_lib.verify.reference import Part, Reference


def test_compare_is_bit_exact():
    a = torch.tensor([1.0, 2.0, 3.0])
    assert compare(a, a.clone()).equal
    b = a.clone()
    b.view(torch.int32)[0] ^= 1  # one ulp
    result = compare(a, b)
    assert not result.equal and result.note == "bytes differ" and 0 < result.max_abs_diff < 1e-6


@pytest.mark.parametrize(
    ("dtype", "numel", "offset"),
    [
        (torch.float32, 1024, 0),  # compared as int64
        (torch.float32, 1023, 0),  # odd count: int32
        (torch.bfloat16, 1023, 0),  # int16
        (torch.uint8, 1023, 0),  # bytes
        (torch.float32, 1024, 1),  # a view starting 4 bytes in: not int64-aligned
    ],
)
def test_compare_sees_one_flipped_bit_at_any_width(dtype, numel, offset):
    base = torch.arange(numel + offset).to(dtype)[offset:]
    for position in (0, numel // 2, numel - 1):
        flipped = base.clone()
        flipped.view(torch.uint8)[position * base.element_size()] ^= 1
        assert compare(base, base.clone()).equal
        assert not compare(base, flipped).equal, (dtype, numel, offset, position)
        assert not compare(flipped, base).equal


def test_compare_sees_signed_zero_and_nan_payload():
    assert not compare(torch.tensor([0.0]), torch.tensor([-0.0])).equal
    nan = torch.tensor([float("nan")])
    assert compare(nan, nan.clone()).equal


def test_compare_dtype_shape_and_values():
    a = torch.zeros(2, 3)
    assert compare(a, a.double()).note == "dtype torch.float32 != torch.float64"
    assert compare(a, a.T.contiguous()).note == "shape [2, 3] != [3, 2]"
    assert compare(0.01, 0.01).equal
    assert compare((0.9, 0.999), [0.9, 0.999]).equal
    assert compare(0.01, 0.02).note == "value 0.01 != 0.02"
    assert compare(a, 1.0).note == "type Tensor != float"
    assert compare(torch.tensor(3.0), torch.tensor(3.0)).equal  # 0-dim (optimizer step)


def test_long_lists_name_their_lengths_and_first_difference():
    """A param group's ``params`` of one pipeline stage against every stage's: the reason
    stays short and says where the lists part."""
    every = [f"layers.{i}.weight" for i in range(12)]
    note = compare(every, every[8:]).note
    assert (
        note
        == "lists differ: 12 items != 4; first at index 0: 'layers.0.weight' != 'layers.8.weight'"
    )
    assert compare(every, every[:-1]).note.endswith(
        "first at index 11: 'layers.11.weight' != (end)"
    )
    assert compare(every, list(every)).equal


def test_flatten_matches_dcp_entry_names(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    state = {
        "model": model.state_dict(),
        "optim": {"state": {"weight": opt.state_dict()["state"][0]},
                  "param_groups": [{**opt.state_dict()["param_groups"][0], "params": ["weight"]}]},
    }  # fmt: skip
    dcp.save(state, checkpoint_id=tmp_path, no_dist=True)
    written = dict(checkpoint_entries(str(tmp_path)))
    flat = flatten(state)
    assert set(flat) == set(written)
    assert "optim.param_groups.0.betas" in flat and "optim.state.weight.exp_avg" in flat
    for name, value in flat.items():
        assert compare(value, written[name]).equal, name


def test_entry_kinds():
    params = {"fc.weight"}
    assert entry_kind("model.fc.weight", params) == "param"
    assert entry_kind("model.scale", params) == "buffer"
    assert entry_kind("optim.state.fc.weight.exp_avg_sq", params) == "optim.exp_avg_sq"
    assert entry_kind("optim.param_groups.0.lr", params) == "optim.param_groups"


def test_merged_comparison_fails_if_any_rank_differs():
    same, differs = EntryComparison(True, 0.0), EntryComparison(False, 0.5, "bytes differ")
    assert merge([same, same]) == EntryComparison(True, 0.0, "")
    merged = merge([same, differs, same])
    assert not merged.equal and merged.max_abs_diff == 0.5 and merged.note == "bytes differ"
    # A rank that could not compare (a type or shape difference) leaves the diff unknown.
    assert merge([same, EntryComparison(False, None, "shape [2] != [3]")]).max_abs_diff is None


def _reference(tmp_path, pieces_by_rank: list[dict], meta: dict) -> Reference:
    """A reference as a saver of len(pieces_by_rank) ranks writes it (rank-<r>.pt files)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    for rank, pieces in enumerate(pieces_by_rank):
        pieces = {name: (*piece, False)[:3] for name, piece in pieces.items()}
        part = {"meta": meta if rank == 0 else {}, "pieces": pieces}
        torch.save(part, tmp_path / f"rank-{rank}.pt")
    return Reference(str(tmp_path))


def test_reference_compares_the_parts_that_overlap(tmp_path):
    whole = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    meta = {"w": {"dtype": torch.float32, "shape": [4, 6]}, "lr": {"value": 0.01}}
    # Saved in rows (FSDP-like), read back whole and by columns (TP-like).
    reference = _reference(tmp_path, [{"w": ([0, 0], whole[:3])}, {"w": ([3, 0], whole[3:])}], meta)
    assert reference.compare("w", whole.clone()).equal
    assert torch.equal(reference.whole("w"), whole)
    assert reference.compare("lr", 0.01).equal and not reference.compare("lr", 0.02).equal
    flipped = whole.clone()
    flipped[3, 5] += 1  # in the second saved part only
    result = reference.compare("w", flipped)
    assert (result.equal, result.max_abs_diff, result.note) == (False, 1.0, "bytes differ")
    assert reference.compare("w", whole[:, :4]).note == "shape [4, 6] != [4, 4]"
    assert reference.compare("w", whole.double()).note == "dtype torch.float32 != torch.float64"
    assert reference.compare("w", 1.0).note == "type Tensor != float"
    assert reference.compare("lr", torch.tensor(0.01)).note == "type float != Tensor"


def test_reference_missing_part_is_not_equal(tmp_path):
    whole = torch.ones(4, 2)
    meta = {"w": {"dtype": torch.float32, "shape": [4, 2]}}
    reference = _reference(tmp_path, [{"w": ([0, 0], whole[:2])}], meta)
    assert reference.compare("w", whole).note == "the saver's reference lacks part of this entry"


def test_reference_keeps_one_copy_of_a_replicated_part(tmp_path):
    step = torch.tensor(2.0)
    meta = {"step": {"dtype": torch.float32, "shape": []}}
    reference = _reference(tmp_path, [{"step": ([], step)}, {"step": ([], step.clone())}], meta)
    assert reference.compare("step", torch.tensor(2.0)).equal
    assert not reference.compare("step", torch.tensor(0.0)).equal  # a 0-dim entry is one part


def test_reference_of_one_process(tmp_path):
    flat = flatten({"model": {"w": torch.randn(3, 2)}, "optim": {"param_groups": [{"lr": 0.1}]}})
    Reference.write(str(tmp_path), flat, rank=0)
    reference = Reference(str(tmp_path))
    assert sorted(reference) == sorted(flat)
    assert all(reference.compare(name, value).equal for name, value in flat.items())


def test_shares_deal_every_entry_once_by_bytes():
    sizes = {"a": 100, "b": 60, "c": 50, "d": 10, "e": 0}
    dealt = shares(sizes, 2)
    assert dealt == [["a", "d", "e"], ["b", "c"]]  # 110 bytes each
    assert shares(sizes, 1) == [sorted(sizes)]
    assert sorted(name for share in shares(sizes, 4) for name in share) == sorted(sizes)


def test_checkpoint_read_in_shares_reads_each_entry_once(tmp_path):
    state = {"model": {f"w{i}": torch.full((i + 1, 3), float(i)) for i in range(5)}}
    dcp.save(state, checkpoint_id=tmp_path, no_dist=True)
    parts = [dict(checkpoint_entries(str(tmp_path), share=(i, 2))) for i in range(2)]
    assert not set(parts[0]) & set(parts[1])
    read = {**parts[0], **parts[1]}
    assert set(read) == set(flatten(state))
    assert all(compare(value, read[name]).equal for name, value in flatten(state).items())


def test_runs_of_elements_compare_with_boxes(tmp_path):
    """FSDP1's flat shards (runs of elements in row-major order) against boxes, both ways."""
    whole = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    meta = {"w": {"dtype": torch.float32, "shape": [4, 6]}}
    flat = whole.reshape(-1)
    runs = [{"w": ([0], flat[:10].clone(), True)}, {"w": ([10], flat[10:].clone(), True)}]
    reference = _reference(tmp_path, runs, meta)
    assert torch.equal(reference.whole("w"), whole)
    for columns in (slice(0, 3), slice(3, 6)):  # TP-like boxes: not runs of elements
        shard = Part((0, columns.start), whole[:, columns])
        assert reference.compare_part("w", shard).equal
    assert reference.compare("w", whole.clone()).equal  # whole: one run
    assert reference.compare("w", FlatPiece(7, flat[7:15].clone(), whole.shape)).equal
    changed = flat[7:15].clone()
    changed[5] += 1  # element 12: in the second saved run
    result = reference.compare("w", FlatPiece(7, changed, whole.shape))
    assert (result.equal, result.max_abs_diff) == (False, 1.0)
    shifted = reference.compare("w", FlatPiece(8, flat[7:15].clone(), whole.shape))
    assert not shifted.equal
    box = whole[:, 3:].clone()
    box[0, 0] += 1
    assert not reference.compare_part("w", Part((0, 3), box)).equal
    # Boxes saved, runs read (an FSDP2 checkpoint loaded under FSDP1).
    boxes = [{"w": ([0, 0], whole[:, :3].clone())}, {"w": ([0, 3], whole[:, 3:].clone())}]
    by_columns = _reference(tmp_path / "columns", boxes, meta)
    assert by_columns.compare("w", FlatPiece(5, flat[5:19].clone(), whole.shape)).equal
    assert not by_columns.compare("w", FlatPiece(5, flat[6:20].clone(), whole.shape)).equal
    lacking = _reference(tmp_path / "lacking", boxes[:1], meta)
    note = lacking.compare("w", FlatPiece(0, flat[:3].clone(), whole.shape)).note
    assert note == "", note  # elements 0..2 lie in the saved columns 0..2
    note = lacking.compare("w", FlatPiece(2, flat[2:5].clone(), whole.shape)).note
    assert note == "the saver's reference lacks part of this entry"


def test_part_runs():
    shape = [4, 6]
    assert Part((1, 0), torch.zeros(2, 6)).run(shape) == (6, 18)  # whole rows
    assert Part((2, 1), torch.zeros(1, 3)).run(shape) == (13, 16)  # part of one row
    assert Part((0, 3), torch.zeros(4, 3)).run(shape) is None  # columns
    assert Part((), torch.zeros(())).run([]) == (0, 1)
    assert Part((5,), torch.zeros(4), flat=True).run(shape) == (5, 9)
    index = Part((1, 2), torch.zeros(2, 2)).indices(shape)
    assert index.tolist() == [8, 9, 14, 15]


def test_shared_storage_names_both_entries_unless_tied():
    a, b = torch.zeros(4), torch.zeros(4)
    view = a[2:]
    state = {"optim.state.w.exp_avg": a, "optim.state.w.exp_avg_sq": view, "model.w": b}
    found = shared_storage(state, lambda name: name)
    assert found == {
        "optim.state.w.exp_avg": "shares storage with optim.state.w.exp_avg_sq, which the "
        "model does not tie",
        "optim.state.w.exp_avg_sq": "shares storage with optim.state.w.exp_avg, which the "
        "model does not tie",
    }
    tied = {"model.embedding.weight": b, "model.output.weight": b}
    ties = {"model.output.weight": "model.embedding.weight"}
    assert shared_storage(tied, lambda name: ties.get(name, name)) == {}
    assert set(shared_storage(tied, lambda name: name)) == set(tied)
    # Neighbouring slices of one storage (FSDP1's flat parameter) do not share bytes.
    flat = torch.zeros(10)
    assert shared_storage({"x": flat[:5], "y": flat[5:], "s": torch.tensor(1.0)}, str) == {}


def test_a_loaders_param_names_compare_as_a_set_and_only_on_the_loaders_side():
    """Check 2 takes a loader's param group names in its optimizer's order (FSDP1 without
    use_orig_params holds the root unit first); another name, a missing or a repeated one
    still fails, and the saver's own lists (checks 0 and 1) stay ordered."""
    from pipeline_lib.verify.bitwise import ParamNames
    from pipeline_lib.verify.checks import names_as_sets
    from pipeline_lib.verify.reference import compare_list_part

    saver = ["blocks.0.w", "blocks.1.w", "head.w"]
    loader = names_as_sets({"optim.param_groups.0.params": ["head.w", "blocks.0.w", "blocks.1.w"],
                            "optim.param_groups.0.betas": [0.9, 0.999]})  # fmt: skip
    assert type(loader["optim.param_groups.0.params"]) is ParamNames
    assert type(loader["optim.param_groups.0.betas"]) is list  # not a names list: ordered
    assert compare(saver, loader["optim.param_groups.0.params"]).equal
    for wrong in (["head.w", "blocks.0.w"], ["head.w", "blocks.0.w", "blocks.2.w"],
                  ["head.w", "blocks.0.w", "blocks.1.w", "head.w"]):  # fmt: skip
        found = compare(saver, ParamNames(wrong))
        assert not found.equal and found.note.startswith("as a set: "), wrong
    assert not compare(saver, list(reversed(saver))).equal  # checks 0 and 1: in order
    # A pipeline stage's part: its names, any order, each in the saver's union once.
    assert compare_list_part(saver, ParamNames(["head.w", "blocks.1.w"])).equal
    assert not compare_list_part(saver, ParamNames(["head.w", "head.w"])).equal
    assert not compare_list_part(saver, ParamNames(["other.w"])).equal
