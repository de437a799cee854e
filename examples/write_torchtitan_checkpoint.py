"""Write a checkpoint the way torchtitan's CheckpointManager lays it out, with plain torch (no
dcp-matrix job): the model's FQNs at the top level, the optimizer flattened under
``optimizer``, a data loader's and the trainer's own state beside them. The model is the
built-in ``transformer``, trained two steps with Adam in one process (no process group).

    .venv/bin/python examples/write_torchtitan_checkpoint.py checkpoints/torchtitan-step-2

``--extra-entry NAME`` adds a model entry the model does not have (a cell must fail naming it).
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from pipeline_lib import models


def train(steps: int, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = models.get("transformer").build()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(steps):
        inputs, targets = model.make_batch(step, 8, seed)
        loss, count = model.loss_sum(model(inputs), targets)
        (loss / count).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="the checkpoint folder to write")
    parser.add_argument("--extra-entry", help="a model entry the model does not have")
    args = parser.parse_args()
    model, optimizer = train(steps=2, seed=7)
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    state = {
        **model.state_dict(),
        "optimizer": get_optimizer_state_dict(model, optimizer, options=flat),
        "dataloader": {"dp_rank_0": torch.tensor([16])},
        "train_state": {"step": torch.tensor(2)},
    }
    if args.extra_entry:
        state[args.extra_entry] = torch.ones(3)
    dcp.save(state, checkpoint_id=args.folder, no_dist=True)  # one process, no process group
    print(f"wrote {args.folder}: {len(state)} top-level keys")


if __name__ == "__main__":
    main()
