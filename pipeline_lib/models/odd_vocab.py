"""odd_vocab: the transformer with a GPT-2-like odd vocabulary and small dims.

GPT-2's vocabulary (50257) divides by no TP degree a user picks; this one (257, a prime) divides
by no TP degree and no FSDP world size at all, so the embedding and the output head are uneven
shards under every sharded layout (torch decides whether it handles them). Only the vocabulary
is odd, as in GPT-2: the heads (4) and the feed-forward size (32) divide TP degrees 2 and 4,
so a TP layout of degree 2 or 4 runs. Its other dims (16; the 8 positions) are below the world
size of a large mesh (configs/large_mesh.yaml): ranks holding empty shards.
"""

from pipeline_lib.models.transformer import Transformer

DIMS = {"vocab": 257, "dim": 16, "heads": 4, "hidden": 32, "layers": 2, "seq_len": 8}


def build(**dims) -> Transformer:
    return Transformer(**{**DIMS, **dims})
