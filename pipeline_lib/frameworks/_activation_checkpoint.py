"""Activation checkpointing as torch's ``apply_activation_checkpointing`` applies it, on the
model's blocks (its ``fsdp_units``): each block replaced in its parent by a ``CheckpointWrapper``
(state entries gain ``_checkpoint_wrapped_module.``, which the state-dict API must remove).
``checkpoint_wrapper`` lives in ``torch.distributed.algorithms._checkpoint`` (a private module
path, the one torch's own tests, torchtitan, accelerate and HF Trainer import;
docs/torch-notes.md). Shared by the ``*_activation_checkpoint`` frameworks."""


def checkpoint_blocks(model, blocks=None) -> list:
    """Wrap each of ``blocks`` (default: the model's blocks, found by identity wherever they sit,
    also inside another wrapper) in ``checkpoint_wrapper``; returns the wrappers."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointWrapper,
        apply_activation_checkpointing,
    )

    ids = {id(unit) for unit in (model.fsdp_units() if blocks is None else blocks)}
    apply_activation_checkpointing(model, check_fn=lambda module: id(module) in ids)
    return [m for m in model.modules() if isinstance(m, CheckpointWrapper)]
