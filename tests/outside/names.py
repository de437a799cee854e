"""A naming of a trainer's own (config ``naming: tests.outside.names:ours``): the checkpoints
of tests/outside/write_checkpoints.py's layout ``mine`` keep the model under ``net``, the
optimizer under ``opt`` and the LR scheduler under ``sched``."""

OURS = {"net": "model", "opt": "optim", "sched": "scheduler"}


def ours(entry: str) -> str | None:
    head, dot, rest = entry.partition(".")
    return OURS[head] + dot + rest if head in OURS else None
