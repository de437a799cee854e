"""Helpers shared by the model modules."""

import torch


def step_generator(seed: int, step: int) -> torch.Generator:
    """A generator for one training step's global batch: same stream for every layout."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def token_batch(step: int, global_batch: int, seed: int, vocab: int, seq_len: int):
    """Next-token prediction batch: inputs and targets are shifted views of one sequence."""
    tokens = torch.randint(vocab, (global_batch, seq_len + 1), generator=step_generator(seed, step))
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def cross_entropy_sum(logits, targets):
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
    )
    return loss, targets.numel()
