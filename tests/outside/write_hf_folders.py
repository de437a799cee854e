"""Hugging Face folders this project did not write: tiny transformers models, random init,
saved with transformers' own ``save_pretrained`` in one process, as a user's fine-tuning starts
from one. No dcp-matrix code runs here and nothing is downloaded (each model is built from its
config class with the values below).

    python tests/outside/write_hf_folders.py FOLDER

writes one folder per entry of ``FOLDERS`` under FOLDER (tests/test_hf_folders.py and
examples/hf_folder.yaml load each through the config key ``checkpoints`` under every layout).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

# The hf_models entries the loading grid names: the same architectures and configs, built here
# with transformers alone.
MODELS = {
    "llama_tiny": {
        "architecture": "LlamaForCausalLM",
        "config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 64,
        },
    },
    # Another family, whose output head is the input embedding (save_pretrained writes it once).
    "qwen2_tied": {
        "architecture": "Qwen2ForCausalLM",
        "config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 64,
            "tie_word_embeddings": True,
        },
    },
}


@dataclass(frozen=True)
class HFFolder:
    """One folder: its model (an entry of MODELS), the seed of its random init, the largest
    shard save_pretrained writes (None: its default, one ``model.safetensors`` here) and the
    dtype it saves in."""

    name: str
    model: str
    seed: int
    max_shard_size: str | None = None
    dtype: str = "float32"


FOLDERS = (
    HFFolder("llama_single", "llama_tiny", seed=1),
    # Four shards and model.safetensors.index.json.
    HFFolder("llama_sharded", "llama_tiny", seed=2, max_shard_size="30KB"),
    HFFolder("qwen2_tied", "qwen2_tied", seed=3),
    # Saved in bfloat16, loaded into the float32 model every existing checkpoint's load builds.
    HFFolder("llama_bf16", "llama_tiny", seed=4, dtype="bfloat16"),
)


def build(model: str, seed: int):
    """The model, as its user builds it: transformers' class from its own config class."""
    import torch
    import transformers

    torch.manual_seed(seed)
    entry = MODELS[model]
    model_class = getattr(transformers, entry["architecture"])
    return model_class(model_class.config_class(**entry["config"]))


def main(folder: str) -> None:
    import torch

    for spec in FOLDERS:
        model = build(spec.model, spec.seed).to(getattr(torch, spec.dtype))
        options = {"max_shard_size": spec.max_shard_size} if spec.max_shard_size else {}
        model.save_pretrained(os.path.join(folder, spec.name), **options)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(sys.argv[1])
