"""Hugging Face ``save_pretrained`` folders as existing checkpoints (format ``hf_safetensors``):
the folder's checks as untrusted input and the import (fast, one process), the config's
errors, and folders written by transformers itself in another process
(tests/outside/write_hf_folders.py) loaded under every layout through DCP's
HuggingFaceStorageReader, bit for bit against the files as the safetensors library reads them,
resumed with a fresh optimizer exactly as Hugging Face's own from_pretrained and a fresh Adam
train on; a tensor changed in the files after the import fails every cell naming it."""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from pipeline_lib.plan import config, grid
from pipeline_lib.plan.config import ConfigError
from pipeline_lib.verify import checkpoint_names, hf_folder
from pipeline_lib.verify.hf_folder import INDEX, SINGLE, HFFolderError, read_folder
from pipeline_lib.verify.results import ImportRecord
from tests import procs
from tests.conftest import REPO
from tests.outside import write_hf_folders as writer
from tests.record_schemas import read_checked

# --- the folder's checks (untrusted input) ----------------------------------------------------


def write_folder(path: Path, files: dict[str, dict[str, torch.Tensor]], index: bool = True):
    """A folder as save_pretrained lays it out: the files, and the index naming each tensor's
    file (``index``), written with the safetensors library."""
    path.mkdir(parents=True, exist_ok=True)
    for name, tensors in files.items():
        save_file(tensors, str(path / name), metadata={"format": "pt"})
    if index:
        weight_map = {t: name for name, tensors in files.items() for t in tensors}
        (path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


SHARDS = {
    "model-00001-of-00002.safetensors": {"a.weight": torch.arange(6.0).reshape(2, 3)},
    "model-00002-of-00002.safetensors": {"b.weight": torch.ones(4), "b.bias": torch.zeros(2)},
}


def index_of(path: Path) -> dict:
    return json.loads((path / INDEX).read_text())


def test_a_folder_is_read_by_its_index_and_its_headers(tmp_path):
    folder = read_folder(str(write_folder(tmp_path / "hf", SHARDS)))
    assert folder.files == tuple(SHARDS) and folder.indexed
    assert {t: s.file for t, s in folder.tensors.items()} == index_of(tmp_path / "hf")["weight_map"]
    read = dict(hf_folder.tensors(folder))
    assert torch.equal(read["a.weight"], SHARDS["model-00001-of-00002.safetensors"]["a.weight"])
    single = read_folder(str(write_folder(tmp_path / "one", {SINGLE: {"w": torch.ones(2)}}, False)))
    assert single.files == (SINGLE,) and not single.indexed and len(single.digest()) == 64


def test_an_index_pointing_outside_the_folder_is_refused_naming_the_file(tmp_path):
    """transformers would open what the index names; DCP's reader lists the folder instead:
    the import refuses an index that names a file anywhere but in the folder itself."""
    hf = write_folder(tmp_path / "hf", SHARDS)
    shutil.copy(hf / "model-00002-of-00002.safetensors", tmp_path / "outside.safetensors")
    for elsewhere in (
        "../outside.safetensors",
        str(tmp_path / "outside.safetensors"),
        "sub/x.safetensors",
    ):
        index = index_of(hf)
        index["weight_map"]["b.weight"] = elsewhere
        (hf / INDEX).write_text(json.dumps(index))
        with pytest.raises(HFFolderError) as info:
            read_folder(str(hf))
        assert str(info.value) == (
            f"{INDEX}: refused: weight_map places b.weight in {elsewhere!r}, outside the "
            "checkpoint's folder (a file of the folder itself is named by its name alone)"
        )


def test_a_missing_shard_and_an_index_that_disagrees_with_the_files_are_errors(tmp_path):
    hf = write_folder(tmp_path / "hf", SHARDS)
    moved = tmp_path / "moved"
    (hf / "model-00002-of-00002.safetensors").rename(moved)
    with pytest.raises(HFFolderError, match=r"^model-00002-of-00002\.safetensors: missing \("
                       rf"{INDEX} places 2 tensor\(s\) in it; first b\.bias\)$"):  # fmt: skip
        read_folder(str(hf))
    moved.rename(hf / "model-00002-of-00002.safetensors")
    index = index_of(hf)
    index["weight_map"]["b.bias"] = "model-00001-of-00002.safetensors"
    (hf / INDEX).write_text(json.dumps(index))
    with pytest.raises(HFFolderError, match=r"places b\.bias in model-00001-of-00002\.safetensors"
                       r", but it is in model-00002-of-00002\.safetensors"):  # fmt: skip
        read_folder(str(hf))
    del index["weight_map"]["b.bias"]
    (hf / INDEX).write_text(json.dumps(index))
    with pytest.raises(HFFolderError, match=r"tensor b\.bias is not in model\.safetensors\.index"):
        read_folder(str(hf))


def forge(path: Path, header: dict, data: bytes) -> None:
    """A safetensors file with any header (one a writer would not make)."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_a_header_that_lies_about_a_tensors_size_is_refused_before_any_read(tmp_path, monkeypatch):
    """Sizes are checked against the file's size and the dtype and shape, from the header alone:
    the safetensors library (which would allocate and read) is never called."""
    import safetensors

    def no_read(*args, **kwargs):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(safetensors, "safe_open", no_read)
    hf = tmp_path / "hf"
    hf.mkdir()
    cases = {
        # 16 bytes of data declared at [0, 4096): beyond the file.
        "beyond": ({"w": {"dtype": "F32", "shape": [1024], "data_offsets": [0, 4096]}}, 16,
                   "tensor w: declares its bytes at [0, 4096) of the data, which holds 16 bytes"),
        # A shape that needs 4096 bytes where the offsets give 16.
        "shape": ({"w": {"dtype": "F32", "shape": [32, 32], "data_offsets": [0, 16]}}, 16,
                  "tensor w: F32 [32, 32] needs 4096 bytes, its header declares 16"),
        "dtype": ({"w": {"dtype": "F128", "shape": [4], "data_offsets": [0, 16]}}, 16,
                  "tensor w: unknown dtype 'F128'"),
        "dcp": ({"__metadata__": {"DCP_SHARDING_INFO": "{}"},
                 "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 16,
                "holds DCP_SHARDING_INFO (DCP's own sharded safetensors: its tensors are chunks)"),
    }  # fmt: skip
    for case, (header, size, why) in cases.items():
        forge(hf / SINGLE, header, bytes(size))
        with pytest.raises(HFFolderError) as info:
            read_folder(str(hf))
        assert str(info.value).startswith(f"{SINGLE}: ") and why in str(info.value), case
    (hf / SINGLE).write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(HFFolderError, match=r"declares a header of 1099511627776 bytes; the file "
                       r"holds 2 after the length"):  # fmt: skip
        read_folder(str(hf))


def test_a_safetensors_file_the_index_does_not_list_is_refused(tmp_path):
    """torch 2.13's HuggingFaceStorageReader ignores the index and reads every .safetensors file
    of the folder (a finding, shown here): a file left beside the shards would be loaded."""
    import torch.distributed.checkpoint as dcp

    hf = write_folder(tmp_path / "hf", SHARDS)
    save_file({"stale.weight": torch.ones(1)}, str(hf / "model.safetensors"))
    names = dcp.HuggingFaceStorageReader(str(hf)).read_metadata().state_dict_metadata
    assert "stale.weight" in names  # the reader under test would read it
    with pytest.raises(HFFolderError, match=rf"^{SINGLE}: not listed in {INDEX}, but DCP's "
                       "HuggingFaceStorageReader reads every .safetensors file"):  # fmt: skip
        read_folder(str(hf))
    (hf / SINGLE).unlink()
    save_file({"a.weight": torch.ones(1), "c": torch.ones(1)}, str(hf / "extra.safetensors"))
    index = index_of(hf)
    index["weight_map"]["c"] = "extra.safetensors"
    (hf / INDEX).write_text(json.dumps(index))
    with pytest.raises(HFFolderError, match=r"tensor a\.weight is also in"):
        read_folder(str(hf))


def test_links_out_of_the_folder_and_fifos_are_refused_unopened(tmp_path):
    outside = write_folder(tmp_path / "elsewhere", {SINGLE: {"w": torch.ones(2)}}, False)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / SINGLE).symlink_to(outside / SINGLE)
    with pytest.raises(HFFolderError, match=rf"^{SINGLE}: refused: a link to .*, outside the "):
        read_folder(str(hf))
    (hf / SINGLE).unlink()
    write_folder(hf, SHARDS)
    os.mkfifo(hf / "stuck.safetensors")  # DCP's reader would open it (and block)
    with pytest.raises(HFFolderError, match=r"^stuck\.safetensors: refused: not a regular file"):
        read_folder(str(hf))


def spec_of(path: Path, model: str = "mlp") -> object:
    raw = {
        "models": [model],
        "layouts": {"single": {"framework": "single", "mesh": [1]}},
        "pairs": "none",
        "checkpoints": {"hf": {"path": str(path), "model": model, "format": "hf_safetensors"}},
    }
    return grid.existing_spec(config.validate(raw), "hf")


def test_the_import_of_a_hostile_folder_is_an_error_record_naming_the_file(in_tmp):
    """The import job's record, the reason its cells carry: one line naming the file; nothing
    written as the reference."""
    from pipeline_lib.job.existing import import_checkpoint

    hf = write_folder(in_tmp / "hf", SHARDS)
    index = index_of(hf)
    index["weight_map"]["b.weight"] = "../../etc/passwd.safetensors"
    (hf / INDEX).write_text(json.dumps(index))
    spec = spec_of(hf)
    import_checkpoint(spec)
    record = read_checked(spec.record, ImportRecord)
    assert record.status == "error" and "\n" not in record.reason
    assert record.reason == (
        f"reading {hf}: HFFolderError: {INDEX}: refused: weight_map places b.weight in "
        "'../../etc/passwd.safetensors', outside the checkpoint's folder (a file of the folder "
        "itself is named by its name alone)"
    )
    assert not Path(spec.reference).exists()


def test_config_json_is_read_as_data_only(in_tmp):
    """Its auto_map names code in the folder: the import imports none of it (the module would
    leave a marker), and records that it is there; the architecture and the values an hf_models
    entry sets are compared, naming the key that differs."""
    from pipeline_lib.job.existing import import_checkpoint

    entries = {"blocks.0.fc1.weight": torch.ones(64, 16)}
    hf = write_folder(in_tmp / "hf", {SINGLE: entries}, False)
    marker = in_tmp / "ran"
    (hf / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    found = {"architectures": ["EvilForCausalLM"], "model_type": "evil", "hidden_size": 64,
             "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}  # fmt: skip
    (hf / "config.json").write_text(json.dumps(found))
    spec = spec_of(hf)
    import_checkpoint(spec)
    record = read_checked(spec.record, ImportRecord)
    assert not marker.exists()
    assert record.config_json["auto_map"] is True and record.model_only is True
    assert record.unplaced_entries == [] and "model.blocks.0.fc1.weight" in record.entries
    llama = writer.MODELS["llama_tiny"]
    assert hf_folder.config_errors(found, llama, "llama_tiny") == [
        "config.json: architectures ['EvilForCausalLM'], the model (hf_models.llama_tiny) is "
        "LlamaForCausalLM",
        "config.json: hidden_size is 64, hf_models.llama_tiny sets 32",
    ]


def test_the_config_names_the_field_of_a_bad_hf_folder(tmp_path):
    def entry(path, **more):
        raw = spec_config(path)
        raw["checkpoints"]["hf"].update(more)
        return raw

    def spec_config(path):
        return {
            "models": ["mlp"],
            "layouts": {"single": {"framework": "single", "mesh": [1]}},
            "pairs": "none",
            "checkpoints": {"hf": {"path": str(path), "model": "mlp", "format": "hf_safetensors"}},
        }

    with pytest.raises(ConfigError, match=r"checkpoints\.hf\.path: .* holds neither "
                       rf"{SINGLE} nor {INDEX} \(a save_pretrained folder\)"):  # fmt: skip
        config.validate(spec_config(tmp_path))
    write_folder(tmp_path, {SINGLE: {"w": torch.ones(1)}}, False)
    assert config.validate(spec_config(tmp_path))["checkpoints"]["hf"]["naming"] == "huggingface"
    with pytest.raises(ConfigError, match=r"checkpoints\.hf\.naming: dcp_matrix names a DCP "
                       "trainer checkpoint's entries; a hf_safetensors folder's are the model's "
                       "own names"):  # fmt: skip
        config.validate(entry(tmp_path, naming="dcp_matrix"))
    with pytest.raises(ConfigError, match=r"checkpoints\.hf\.format: 'gguf' is not one of"):
        config.validate(entry(tmp_path, format="gguf"))
    with pytest.raises(ConfigError, match=r"no \.metadata in it; it holds a Hugging Face folder's "
                       "weights: format hf_safetensors"):  # fmt: skip
        config.validate(entry(tmp_path, format="dcp"))


def test_the_huggingface_naming_puts_every_tensor_in_the_model():
    hf = checkpoint_names.Naming("huggingface")
    assert hf.ours("model.layers.0.mlp.up_proj.weight") == "model.model.layers.0.mlp.up_proj.weight"
    known = {"model.user_model.lm_head.weight", "model.user_model.model.norm.weight"}
    places = checkpoint_names.place(
        ["lm_head.weight", "model.norm.weight", "extra"], hf, known, "user_model."
    )
    assert places.ours == {"lm_head.weight": "model.user_model.lm_head.weight",
                           "model.norm.weight": "model.user_model.model.norm.weight"}  # fmt: skip
    assert places.unplaced == ("extra",) and places.model_only
    titan = checkpoint_names.place(
        ["w", "optimizer.state.w.step"], checkpoint_names.Naming("torchtitan"), {"model.w"}
    )
    assert not titan.model_only


def test_the_shipped_example_loads_the_writers_folders():
    """examples/hf_folder.yaml names each folder tests/outside/write_hf_folders.py writes, with
    the hf_models entry it was saved from (docs/existing-checkpoints.md runs both)."""
    import yaml

    example = yaml.safe_load((REPO / "examples/hf_folder.yaml").read_text())
    assert example["hf_models"] == writer.MODELS
    assert example["checkpoints"] == {
        f.name: {"path": f"checkpoints/hf/{f.name}", "model": f.model, "format": "hf_safetensors"}
        for f in writer.FOLDERS
    }


# --- folders written by transformers in another process, loaded under every layout ----------

LAYOUTS = {
    "single": {"framework": "single", "mesh": [1]},
    "fsdp2_2": {"framework": "fsdp2", "mesh": [2]},
    "tp_2": {"framework": "tp", "mesh": [2]},
    "fsdp2_tp_2x2": {"framework": "fsdp2_tp", "mesh": [2, 2]},
}
# One tensor of a copy of llama_sharded, changed in its file after the import.
ALTERED = "model.layers.1.mlp.up_proj.weight"
PASSING = ("llama_single", "llama_sharded", "qwen2_tied")


def hf_config(folder: Path) -> dict:
    checkpoints = {
        spec.name: {
            "path": str(folder / spec.name),
            "model": spec.model,
            "format": "hf_safetensors",
        }
        for spec in writer.FOLDERS
    }
    altered = {**checkpoints["llama_sharded"], "path": str(folder / "llama_altered")}
    return {
        "models": list(writer.MODELS),
        "hf_models": writer.MODELS,
        "layouts": LAYOUTS,
        "pairs": "none",
        "train": {"global_batch": 4},
        "checkpoints": {**checkpoints, "llama_altered": altered},
    }


@dataclass(frozen=True)
class Loaded:
    folder: Path
    config: dict
    rows: list[dict]  # matrix.parquet
    tensors: list[dict]  # tensors.parquet
    records: dict[str, ImportRecord]  # checkpoint name -> its import record


def change_tensor_bytes(folder: Path, tensor: str) -> None:
    """Flip the sign bit of the first element of ``tensor`` in its file (the same size)."""
    stored = read_folder(str(folder)).tensors[tensor]
    path = folder / stored.file
    data = bytearray(path.read_bytes())
    data[stored.begin + 3] ^= 0x80  # float32, little-endian: the sign is in the 4th byte
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> Loaded:
    """Every folder of tests/outside/write_hf_folders.py, written by transformers in a process
    of its own, and a copy of llama_sharded whose ALTERED changes after the import; each
    imported, then loaded by one load job per layout, then aggregated."""
    from pipeline_lib.job.existing import import_checkpoint
    from tests.jobs import cli_all
    from tests.test_existing import run_cli

    folder = tmp_path_factory.mktemp("hf")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(REPO / "tests/outside/write_hf_folders.py"), str(folder / "hf")]
    proc = procs.run(command, timeout=300, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    shutil.copytree(folder / "hf/llama_sharded", folder / "hf/llama_altered")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("PYTHONPATH", str(REPO))
        cfg = config.validate(hf_config(folder / "hf"))
        for name in cfg["checkpoints"]:
            import_checkpoint(grid.existing_spec(cfg, name))
        change_tensor_bytes(folder / "hf/llama_altered", ALTERED)
        layouts = [layout for _, layout in grid.load_jobs(cfg)]
        cli_all("load", [grid.load_job_spec(cfg, grid.RESULTS, layout) for layout in layouts])
        records = [p for layout in layouts for p in grid.load_outputs(cfg, grid.RESULTS, layout)]
        run_cli("aggregate", "--matrix", "m.parquet", "--tensors", "t.parquet", *records)
        imported = {
            n: read_checked(grid.existing_record_path(n), ImportRecord) for n in cfg["checkpoints"]
        }
        rows, tensors = (pq.read_table(p).to_pylist() for p in ("m.parquet", "t.parquet"))
        return Loaded(folder / "hf", cfg, rows, tensors, imported)


def cells(loaded: Loaded, name: str) -> dict[str, dict]:
    return {r["load_layout"]: r for r in loaded.rows if r["save_layout"] == name}


@pytest.mark.torchrun
def test_hf_folders_load_bit_for_bit_under_every_layout(loaded):
    """One file, shards with an index, another family with tied embeddings: every tensor of
    the files equal under single, FSDP2, TP and FSDP2+TP, the tied head through the embedding
    it is; the resume starts with a fresh optimizer and says so."""
    for name in PASSING:
        record, found = loaded.records[name], cells(loaded, name)
        assert set(found) == set(LAYOUTS), name
        assert record.model_only and record.unplaced_entries == [], name
        for layout, row in found.items():
            assert (row["status"], row["reason"]) == ("pass", ""), (name, layout)
            assert row["entries_checked"] == len(record.entries) > 20, (name, layout)
            assert row["resume_optimizer"] == "fresh" and row["resume_max_rel_diff"] <= 1e-5
            assert row["save_framework"] == "existing" and len(row["source_metadata_sha256"]) == 64
    assert len(loaded.records["llama_sharded"].files) == 4
    tied = {"model.user_model.lm_head.weight": "model.user_model.model.embed_tokens.weight"}
    assert loaded.records["qwen2_tied"].tied_entries == tied
    compared = {
        (t["save_layout"], t["load_layout"], t["entry"]) for t in loaded.tensors if t["load_equal"]
    }
    for layout in LAYOUTS:
        assert ("qwen2_tied", layout, "model.user_model.lm_head.weight") in compared
        assert (
            "llama_sharded",
            layout,
            "model.user_model.model.layers.1.self_attn.q_proj.weight",
        ) in compared


@pytest.mark.torchrun
def test_the_resume_trains_as_from_pretrained_and_a_fresh_adam_do(loaded):
    """The loaded model's resumed losses, step by step, equal those of Hugging Face's own load
    (from_pretrained, not DCP) trained by a new torch.optim.Adam on the same batches: the
    resume starts from the files' weights and no optimizer state."""
    import transformers

    from pipeline_lib.models._common import step_generator

    train = loaded.config["train"]
    for name in ("llama_single", "qwen2_tied"):
        spec = next(s for s in writer.FOLDERS if s.name == name)
        architecture = getattr(transformers, writer.MODELS[spec.model]["architecture"])
        model = architecture.from_pretrained(loaded.folder / name, attn_implementation="eager")
        model.train()
        adam = torch.optim.Adam(model.parameters(), lr=train["lr"])
        expected = []
        for step in range(train["steps"], train["steps"] + train["resume_steps"]):
            ids = torch.randint(
                64, (train["global_batch"], 8), generator=step_generator(train["seed"], step)
            )
            loss = model(input_ids=ids, labels=ids).loss
            expected.append(loss.item())
            loss.backward()
            adam.step()
            adam.zero_grad()
        for layout, row in cells(loaded, name).items():
            assert row["resume_losses"] == pytest.approx(expected, rel=1e-5), (name, layout)


@pytest.mark.torchrun
def test_a_tensor_changed_in_the_files_after_the_import_fails_every_cell_naming_it(loaded):
    ours = f"model.user_model.{ALTERED}"
    for layout, row in cells(loaded, "llama_altered").items():
        assert row["status"] == "fail", layout
        assert row["reason"].startswith(
            f"loader vs saver: 1 of {row['entries_checked']} entries differ; first {ours}"
        ), row["reason"]


@pytest.mark.torchrun
def test_a_bfloat16_folder_loads_into_the_float32_model_with_its_dtype_changed(loaded):
    """DCP's reader copies each tensor into the model's own (``copy_``: bfloat16 into float32,
    without a word): the values are the files' exactly, the dtype is not, and check 2 says so
    (kept as data: the load of an existing checkpoint builds its model in float32)."""
    for layout, row in cells(loaded, "llama_bf16").items():
        assert row["status"] == "fail", layout
        assert row["reason"].endswith("dtype torch.bfloat16 != torch.float32"), row["reason"]
        assert row["entries_mismatched"] == row["entries_checked"] == 21
