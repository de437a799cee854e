"""A naming of a trainer's own (config ``naming: tests.outside.names:ours``): the checkpoints
of tests/outside/write_checkpoints.py's layout ``mine`` keep the model under ``net`` and the
optimizer under ``opt``."""


def ours(entry: str) -> str | None:
    head, _, rest = entry.partition(".")
    return {"net": "model.", "opt": "optim."}[head] + rest if head in ("net", "opt") else None
