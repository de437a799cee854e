"""Reproducer (torch-checkpointing 0.1.1, torchtitan 0.3.0): torchtitan's backend for
torch-checkpointing cannot be imported.

torchtitan 0.3.0's ``torchtitan.components.checkpointer.torch_checkpointing`` (its backend for the
library, the one torchtitan plans to move to) imports ``DTensorResharder`` from
``torch_checkpointing.dtensor_resharder``; torch-checkpointing 0.1.1, the release on PyPI,
has no such module (its DTensor resharder is ``torch_checkpointing.default_resharder``'s
``DefaultResharder``). torchtitan declares ``torch-checkpointing`` without a version.

Run from anywhere (no GPU, no process group; `bash scripts/setup.sh --torch-checkpointing
--torchtitan`):
    python scripts/repro/torch_checkpointing_dtensor_resharder.py
Prints BUG and exits 1 where the module is missing; OK and 0 where it imports.
"""

import importlib
import sys
from importlib.metadata import version


def main() -> int:
    release = version("torch-checkpointing")
    try:
        importlib.import_module("torch_checkpointing.dtensor_resharder")
    except ModuleNotFoundError as exc:
        print(f"BUG: torch-checkpointing {release}: {exc}")
        try:
            importlib.import_module("torchtitan.components.checkpointer.torch_checkpointing")
        except ModuleNotFoundError as titan:
            print(f"     torchtitan {version('torchtitan')}'s backend: {titan}")
        return 1
    print(f"OK: torch-checkpointing {release} has torch_checkpointing.dtensor_resharder")
    return 0


if __name__ == "__main__":
    sys.exit(main())
