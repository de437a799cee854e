"""torchtitan <-> Hugging Face conversion, checked (docs: existing-checkpoints.md, "torchtitan
and Hugging Face"). Imports torch, torchtitan and transformers (the optional extra).

torchtitan's ``StateDictAdapter`` of llama3 renames every entry and permutes the rows of the
query and key projections (its RoPE pairs dimensions (2i, 2i+1), Hugging Face's (i, i + d/2)).
Each direction loads a checkpoint the way torchtitan does and checks three things:

- **converted** (exact): what the loaded model holds equals the adapter's own conversion of the
  files read independently (DCP's single-process reader; safetensors' own reader), bit for bit;
- **round trip** (exact): ``from_hf(to_hf(files))`` (or ``to_hf(from_hf(files))``) is the files,
  bit for bit;
- **logits** (not exact): both models on the same tokens agree within ``LOGITS_ATOL``: they
  compute RoPE differently (complex products vs. rotate-half), so the same weights give logits
  a float rounding apart. Only this check sees an adapter that renames without permuting: its
  conversion equals itself, its round trip is the identity, and its logits differ.

    .venv/bin/python -m pipeline_lib.verify.torchtitan_hf write-hf hf-llama3
    .venv/bin/python -m pipeline_lib.verify.torchtitan_hf check --hf-folder hf-llama3 \\
        --checkpoint checkpoints/torchtitan/llama3_debug/checkpoint/step-2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipeline_lib.models._torchtitan import TitanModelDefinition

# The logits of the two models may differ by this much (absolute) on the same weights: RoPE in
# complex arithmetic (torchtitan) vs rotate-half (transformers), float32. Measured on the llama3
# debug model: below 1e-5 (docs/existing-checkpoints.md).
LOGITS_ATOL = 1e-4
TOKENS = (2, 16)  # the batch both models run on (seeded)


@dataclass(frozen=True)
class Conversion:
    """One direction's checks; ``first_difference``: the first entry that is not equal."""

    direction: str  # torchtitan->hf | hf->torchtitan
    entries: int
    converted_equal: bool
    round_trip_equal: bool
    first_difference: str
    logits_max_abs_diff: float
    logits_atol: float

    @property
    def ok(self) -> bool:
        return (self.converted_equal and self.round_trip_equal
                and self.logits_max_abs_diff <= self.logits_atol)  # fmt: skip


def hf_config(definition: TitanModelDefinition) -> dict:
    """The ``hf_models`` entry of the Hugging Face Llama with the torchtitan llama3's shapes,
    norms and RoPE (theta and llama3 scaling)."""
    config = definition.config()
    attention, block = config.layers[0].attention, config.layers[0]
    rope = attention.rope
    parameters = {"rope_type": "default", "rope_theta": rope.theta}
    if rope.scaling == "llama":
        original = rope.original_max_position_embeddings
        parameters.update(rope_type="llama3", factor=rope.scaling_factor,
                          low_freq_factor=rope.low_freq_factor,
                          high_freq_factor=rope.high_freq_factor,
                          original_max_position_embeddings=original)  # fmt: skip
    values = {
        "hidden_size": config.dim,
        "intermediate_size": block.feed_forward.w1.out_features,
        "num_hidden_layers": len(config.layers),
        "num_attention_heads": attention.n_heads,
        "num_key_value_heads": attention.n_kv_heads or attention.n_heads,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": block.attention_norm.eps,
        "max_position_embeddings": rope.max_seq_len,
        "tie_word_embeddings": config.enable_weight_tying,
        "rope_parameters": parameters,
    }
    return {"architecture": "LlamaForCausalLM", "config": values, "seq_len": TOKENS[1]}


def _models(definition: TitanModelDefinition):
    """(torchtitan's model, the Hugging Face Llama, torchtitan's adapter), fresh inits."""
    from torchtitan.models.llama3 import Llama3StateDictAdapter

    from pipeline_lib.models._hf import HFModelDefinition

    if definition.model != "llama3":
        raise ValueError("the Hugging Face conversion is checked for torchtitan's llama3")
    torch.manual_seed(0)
    titan = definition.build().eval()
    hf = HFModelDefinition.from_dict(hf_config(definition)).build().eval()
    return titan, hf, Llama3StateDictAdapter(titan.config, None)


def _first_difference(found: dict, expected: dict) -> str:
    """The first entry (name order) that differs in presence, dtype, shape or any bit; ''."""
    for name in sorted(set(found) | set(expected)):
        a, b = found.get(name), expected.get(name)
        if a is None or b is None:
            return f"{name}: {'missing' if a is None else 'not expected'}"
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            return f"{name}: differs"
    return ""


def _logits_diff(titan, hf, vocab: int) -> float:
    tokens = torch.randint(vocab, TOKENS, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return float((titan(tokens) - hf(input_ids=tokens).logits).abs().max())


def _detached(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


def from_torchtitan(checkpoint: str, definition: TitanModelDefinition) -> Conversion:
    """A torchtitan step folder into the Hugging Face Llama through the adapter: its model
    entries dcp.load-ed into torchtitan's model (``load_state_dict``, as its CheckpointManager
    does), ``to_hf`` of that model's state into the Llama."""
    import torch.distributed.checkpoint as dcp

    from pipeline_lib.verify.readers import checkpoint_entries
    from pipeline_lib.verify.untrusted import SafeFileSystemReader, SafeLoadPlanner

    titan, hf, adapter = _models(definition)
    state = titan.state_dict()
    dcp.load(state, storage_reader=SafeFileSystemReader(checkpoint), planner=SafeLoadPlanner())
    titan.load_state_dict(state)
    hf.load_state_dict(adapter.to_hf(_detached(titan.state_dict())))
    files = {n: v for n, v in checkpoint_entries(checkpoint) if n in state}
    converted = _first_difference(_detached(hf.state_dict()), adapter.to_hf(dict(files)))
    back = _first_difference(adapter.from_hf(adapter.to_hf(dict(files))), files)
    return Conversion("torchtitan->hf", len(files), not converted, not back,
                      converted or back, _logits_diff(titan, hf, titan.config.vocab_size),
                      LOGITS_ATOL)  # fmt: skip


def from_hf(folder: str, definition: TitanModelDefinition) -> Conversion:
    """A Hugging Face folder (``save_pretrained``) into torchtitan's model the way its
    CheckpointManager loads one (``initial_load_in_hf``): ``dcp.load`` of ``to_hf`` of the
    model's state through DCP's HuggingFaceStorageReader, ``from_hf``, ``load_state_dict``."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    titan, _, adapter = _models(definition)
    wanted = adapter.to_hf(_detached(titan.state_dict()))
    dcp.load(wanted, storage_reader=adapter.get_hf_storage_reader(folder))
    titan.load_state_dict(adapter.from_hf(wanted))
    files = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        files.update(load_file(shard))
    converted = _first_difference(_detached(titan.state_dict()), adapter.from_hf(dict(files)))
    back = _first_difference(adapter.to_hf(adapter.from_hf(dict(files))), files)
    hf = LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    return Conversion("hf->torchtitan", len(files), not converted, not back,
                      converted or back, _logits_diff(titan, hf, titan.config.vocab_size),
                      LOGITS_ATOL)  # fmt: skip


def write_hf(folder: str, definition: TitanModelDefinition, seed: int = 0) -> None:
    """``save_pretrained`` of the ``hf_models`` Llama with the torchtitan model's config."""
    from pipeline_lib.models._hf import HFModelDefinition

    torch.manual_seed(seed)
    HFModelDefinition.from_dict(hf_config(definition)).build().save_pretrained(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["write-hf", "check"])
    parser.add_argument("folder", nargs="?", help="write-hf: the folder to write")
    parser.add_argument("--model", default="llama3")
    parser.add_argument("--flavor", default="debugmodel")
    parser.add_argument("--unfused", action="store_true", help="separate wq/wk/wv")
    parser.add_argument("--checkpoint", help="check: a torchtitan step folder")
    parser.add_argument("--hf-folder", help="check: a save_pretrained folder")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    definition = TitanModelDefinition(args.model, args.flavor, False if args.unfused else None)
    if args.command == "write-hf":
        write_hf(args.folder, definition)
        return 0
    found = []
    if args.checkpoint:
        found.append(from_torchtitan(args.checkpoint, definition))
    if args.hf_folder:
        found.append(from_hf(args.hf_folder, definition))
    for conversion in found:
        print(json.dumps({**asdict(conversion), "ok": conversion.ok}))
    return 0 if found and all(c.ok for c in found) else 1


if __name__ == "__main__":
    sys.exit(main())
