"""Uneven shards: torch decides them. The pipeline skips a TP cell before torch runs only where
the model's own arithmetic needs whole parts per TP rank (attention heads); a vocabulary or a
hidden size the TP degree does not divide runs, and torch's own error, if any, is the verdict.
FSDP2 pads uneven shards: the padding is in no checkpoint entry and no saver's reference."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from pipeline_lib import models
from pipeline_lib.common.errors import Incompatible
from pipeline_lib.job.training import check_tp_degree
from pipeline_lib.verify.reference import Reference

HEADS_SKIP = (
    "TP degree 3 does not divide {model} heads=4: the model computes whole heads on each TP "
    "rank (split, it would be another model)"
)


def built(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return models.get(name).build()


@pytest.mark.parametrize(
    ("model", "degree"),
    [
        ("odd_vocab", 2),  # vocabulary 257 uneven, heads 4 whole
        ("odd_vocab", 4),
        ("mlp_uneven", 2),  # hidden 25, dims 7 and 13: every TP size uneven
        ("mlp_uneven", 3),
        ("mlp_uneven", 4),
        ("tied_embedding", 3),  # hidden 32
        ("transformer", 4),
    ],
)
def test_a_size_torch_can_shard_unevenly_is_no_skip(model, degree):
    check_tp_degree(built(model), model, degree)  # torch runs the cell


@pytest.mark.parametrize("model", ["odd_vocab", "transformer"])
def test_heads_the_tp_degree_does_not_divide_stay_a_skip_saying_why(model):
    with pytest.raises(Incompatible) as exc:
        check_tp_degree(built(model), model, 3)
    assert str(exc.value) == HEADS_SKIP.format(model=model)


def test_only_heads_are_the_models_tp_dims():
    dims = {name: built(name).tp_dims() for name in models.names()}
    heads = {"odd_vocab": {"heads": 4}, "transformer": {"heads": 4}, "moe": {"heads": 2}}
    assert dims == {name: heads.get(name, {}) for name in models.names()}


def test_odd_vocab_is_odd_where_it_says():
    model = built("odd_vocab")
    assert model.tok_embeddings.weight.shape == model.output.weight.shape == (257, 16)
    assert model.heads == 4 and model.hidden == 32 and model.pos_embeddings.shape == (8, 16)


USER_MODULE_WITH_HEADS = """
        import torch
        from torch import nn
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        def build():
            return nn.Sequential(nn.Linear(4, 25), nn.ReLU(), nn.Linear(25, 4))

        def make_inputs(batch_size, generator):
            return torch.randn(batch_size, 4, generator=generator)

        def tp_plan(model):
            return {"0": ColwiseParallel(), "2": RowwiseParallel()}

        def tp_dims(model):
            return {"heads": 3}
        """


def test_an_import_path_models_own_tp_dims_stay_and_its_plan_sizes_do_not(tmp_path, monkeypatch):
    name = "user_model_with_heads"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE_WITH_HEADS))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    model = models.get(f"{name}:build").build()
    assert model.tp_dims() == {"heads": 3}  # not 0.out_features=25, 2.in_features=25
    with pytest.raises(Incompatible, match=r"^TP degree 2 does not divide .* heads=3: the model "):
        check_tp_degree(model, f"{name}:build", 2)
    check_tp_degree(model, f"{name}:build", 3)


# ---- One small torchrun run: odd_vocab and mlp_uneven under tp_2, fsdp2_tp_2x2 and fsdp2_3.

UNEVEN = {
    "models": ["odd_vocab", "mlp_uneven"],
    "layouts": {
        "fsdp2_3": {"framework": "fsdp2", "mesh": [3]},
        "tp_2": {"framework": "tp", "mesh": [2]},
        "fsdp2_tp_2x2": {"framework": "fsdp2_tp", "mesh": [2, 2]},
    },
    "pairs": [["fsdp2_3", "tp_2"], ["tp_2", "fsdp2_tp_2x2"], ["fsdp2_tp_2x2", "fsdp2_3"]],
    "run": {"cell_timeout_s": 120},
}
# torch's own error: ColwiseParallel hands RowwiseParallel a local shard that DTensor.from_local
# takes for an even one (13 of 25 columns -> 26; scripts/repro/tp_uneven_colwise_rowwise.py).
REDUCTION = "RuntimeError: a and b must have same reduction dim, but got [{batch}, 26] X [25, 7]."


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> tuple[Path, dict]:
    """The grid's save and load jobs in one folder: (folder, {(model, save, load): row})."""
    from tests.conftest import REPO
    from tests.jobs import run_grid

    folder = tmp_path_factory.mktemp("uneven")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("PYTHONPATH", str(REPO))
        rows = run_grid(UNEVEN)
    return folder, {key[1:]: row for key, row in rows.items()}


@pytest.mark.torchrun
def test_torch_shards_an_odd_vocabulary_under_tp_fsdp2_tp_and_fsdp2(uneven):
    _, rows = uneven
    for pair in UNEVEN["pairs"]:
        row = rows[("odd_vocab", *pair)]
        assert (row["status"], row["reason"]) == ("pass", ""), pair
        assert row["entries_checked"] > 40 and row["entries_mismatched"] == 0


@pytest.mark.torchrun
def test_an_uneven_hidden_under_tp_is_torchs_own_error(uneven):
    _, rows = uneven
    # Loaded into tp_2: every state entry loads bit for bit, then the resumed forward raises.
    loaded = rows["mlp_uneven", "fsdp2_3", "tp_2"]
    assert (loaded["status"], loaded["reason"]) == (
        "error", f"load: resume: {REDUCTION.format(batch=8)}",
    )  # fmt: skip
    assert loaded["entries_checked"] > 40 and loaded["entries_mismatched"] == 0
    # Saved under TP: the first training step raises (global batch 8; 4 per FSDP2+TP dp rank).
    for save, batch in [("tp_2", 8), ("fsdp2_tp_2x2", 4)]:
        (row,) = [row for key, row in rows.items() if key[:2] == ("mlp_uneven", save)]
        reason = f"save: {REDUCTION.format(batch=batch)} (during train)"
        assert (row["status"], row["reason"]) == ("error", reason)


def whole_cover(size, chunks) -> bool:
    """The chunks lie inside ``size`` and their volumes add up to it (DCP writes no overlap)."""
    inside = all(
        all(o + n <= s for o, n, s in zip(c.offsets, c.sizes, size, strict=True)) for c in chunks
    )
    return inside and sum(torch.Size(c.sizes).numel() for c in chunks) == torch.Size(size).numel()


@pytest.mark.torchrun
def test_fsdp2s_padding_is_in_no_checkpoint_entry_nor_reference(uneven):
    """Under fsdp2_3 the 257 rows shard 86, 86, 85 (FSDP2 pads the last to 86): every entry of
    the checkpoint has the model's own size, read from the files with torch's reader (no
    process group, no pipeline code), and its chunks tile it; so do the saver's reference
    pieces the checks compare with."""
    from torch.distributed.checkpoint import FileSystemReader

    folder, _ = uneven
    shapes = {n: p.shape for n, p in built("odd_vocab").named_parameters()}
    root = folder / "results/save/odd_vocab/fsdp2_3"
    metadata = FileSystemReader(str(root / "checkpoint")).read_metadata().state_dict_metadata
    sized = {
        key: meta
        for key, meta in metadata.items()
        if hasattr(meta, "chunks") and key.startswith(("model.", "optim.state."))
    }
    expected = {f"model.{n}": s for n, s in shapes.items()}
    expected |= {
        f"optim.state.{n}.{k}": s for n, s in shapes.items() for k in ("exp_avg", "exp_avg_sq")
    }
    expected |= {f"optim.state.{n}.step": torch.Size([]) for n in shapes}
    assert {key: tuple(meta.size) for key, meta in sized.items()} == {
        key: tuple(size) for key, size in expected.items()
    }
    assert all(whole_cover(meta.size, meta.chunks) for meta in sized.values())
    assert len(sized["model.tok_embeddings.weight"].chunks) == 3
    reference = Reference(str(root / "reference"))
    for name, size in shapes.items():
        whole = reference.whole(f"model.{name}")
        assert whole.shape == size
        pieces = reference.pieces[f"model.{name}"]
        assert whole_cover(size, [Chunk(p.offsets, p.data.shape) for p in pieces]), name


class Chunk(NamedTuple):
    offsets: tuple
    sizes: tuple
