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


def split_batch(batch, parts: int, index: int):
    """Part ``index`` of ``parts`` of a batch on dim 0: a tensor, a dict of tensors (each split;
    anything else kept whole), or an object with its own ``split(parts, index)``."""
    if isinstance(batch, torch.Tensor):
        return batch.tensor_split(parts)[index]
    if isinstance(batch, dict):
        return {k: split_batch(v, parts, index) if _splits(v) else v for k, v in batch.items()}
    return batch.split(parts, index)


def _splits(value) -> bool:
    return isinstance(value, (torch.Tensor, dict)) or hasattr(value, "split")


def batch_to(batch, device: torch.device, float_dtype: torch.dtype):
    """A batch (tensor or dict of tensors; or an object with its own ``moved(device, dtype)``)
    on ``device``, floating tensors of ``float_dtype``."""
    if hasattr(batch, "moved"):
        return batch.moved(device, float_dtype)
    if isinstance(batch, dict):
        return {k: batch_to(v, device, float_dtype) for k, v in batch.items()}
    if not isinstance(batch, torch.Tensor):
        return batch
    batch = batch.to(device)
    return batch.to(float_dtype) if batch.is_floating_point() else batch
