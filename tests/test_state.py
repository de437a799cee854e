"""Entry flattening and bit-exact comparison (torch, single process)."""

import pytest
import torch
import torch.distributed.checkpoint as dcp

from pipeline_lib.state import (
    EntryComparison,
    checkpoint_entries,
    compare,
    entry_kind,
    flatten,
    merge,
)


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
