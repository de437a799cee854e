"""mlp_frozen: the mlp with its first block frozen (``requires_grad=False``).

Exercises frozen parameters: they are in the model state but get no gradient and no optimizer
state, and ``StateDictOptions(ignore_frozen_params=True)`` leaves them out of the state dict.
Like pretrained weights, the frozen block comes from a fixed seed, not the job's: the loader
(another seed) gets it from its own init, not from the checkpoint, and resumes like the saver.
"""

import torch

from pipeline_lib.models import mlp

PRETRAINED_SEED = 12345


def build(**dims) -> mlp.MLP:
    model = mlp.build(**dims)
    with torch.random.fork_rng():
        torch.manual_seed(PRETRAINED_SEED)
        for param in model.blocks[0].parameters():
            torch.nn.init.normal_(param, std=0.1)
    model.blocks[0].requires_grad_(False)
    return model
