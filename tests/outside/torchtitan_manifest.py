"""The recorded manifest of a real torchtitan step folder (``torchtitan_llama3_debug.json``
beside this file): every entry's name, kind, dtype and shape as its ``.metadata`` says, and the
names of the model it belongs to (its state dict's and its parameters'), so that the
``torchtitan`` naming is tested against what torchtitan writes without torchtitan installed.

Recorded from ``examples/torchtitan_train.py``'s ``llama3_debug`` (torchtitan 0.3.0, torch
2.13.0, 2 gloo ranks); again with the extra installed:

    PYTHONPATH=. .venv/bin/python tests/outside/torchtitan_manifest.py \\
        checkpoints/torchtitan/llama3_debug
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

FIXTURE = Path(__file__).with_name("torchtitan_llama3_debug.json")


def folder_entries(step_folder: str) -> dict[str, str]:
    """{entry: "tensor float32 [768, 256]" | "bytes"} from the folder's ``.metadata``."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from pipeline_lib.verify.untrusted import SafeFileSystemReader

    found = {}
    for name, meta in SafeFileSystemReader(step_folder).read_metadata().state_dict_metadata.items():
        if isinstance(meta, TensorStorageMetadata):
            dtype = str(meta.properties.dtype).removeprefix("torch.")
            found[name] = f"tensor {dtype} {list(meta.size)}"
        else:
            found[name] = "bytes"
    return dict(sorted(found.items()))


def record(out: str) -> dict:
    """The manifest of ``<out>/checkpoint/step-2`` and the model its writer trained."""
    from pipeline_lib.models._torchtitan import TitanModelDefinition

    writer = json.loads((Path(out) / "writer.json").read_text())
    model = TitanModelDefinition(writer["model"], writer["flavor"]).build()
    return {
        "writer": {k: writer[k] for k in ("torchtitan", "torch", "model", "flavor", "world_size")},
        "model_state": sorted(model.state_dict()),
        "parameters": sorted(n for n, _ in model.named_parameters()),
        "entries": folder_entries(str(Path(out) / "checkpoint" / f"step-{writer['steps']}")),
    }


if __name__ == "__main__":
    FIXTURE.write_text(json.dumps(record(sys.argv[1]), indent=0) + "\n")
    print(f"wrote {FIXTURE}")
