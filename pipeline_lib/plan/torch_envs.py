"""Build the virtual environment of one ``torch_versions`` entry: that torch, the packages the
jobs import (at the project's pins), and this project installed editable, so the save and load
jobs run the same pipeline code under another PyTorch release."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline_lib.common.atomic import write_with

REPO = Path(__file__).resolve().parents[2]
# Written into an environment's folder before anything else: make_env deletes a folder only if
# it carries this file (it made the folder), whatever torch_env_dir and the version name say.
MARKER = ".dcp-matrix-env"
# What a save or load job imports besides torch (pandas: the CLI's gate commands; numpy:
# torch wheels other than the local CPU build do not pull it in; xxhash: the seal; covertable:
# a job expands a pairwise grid to its items). The rule
# torch_env takes their pins as a param, so a change here rebuilds the environments.
JOB_PACKAGES = (
    "numpy", "pandas", "pyarrow", "jsonschema", "PyYAML", "psutil", "safetensors", "xxhash",
    "covertable",
)  # fmt: skip


def pinned(names: tuple[str, ...]) -> list[str]:
    """The project's pins (requirements.txt, constraints.txt) for ``names``; a bare name if none."""
    pins = {}
    for file in ("requirements.txt", "constraints.txt"):
        for line in (REPO / file).read_text().splitlines():
            match = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line.strip())
            if match:
                pins[match.group(1).lower()] = match.group(0)
    return [pins.get(name.lower(), name) for name in names]


class NotOurs(RuntimeError):
    """The environment's folder exists and was not made by make_env: it is left alone."""


def make_env(prefix: Path, requirement: str) -> None:
    """(Re)build ``prefix``; its ``packages.txt`` (pip freeze) is written last, atomically.
    An existing folder is deleted only if it carries MARKER (an earlier make_env made it);
    an empty one is used as is; any other is refused."""
    from pipeline_lib.plan.config import requirement_error

    if error := requirement_error(requirement):
        raise ValueError(error)
    if prefix.is_symlink() or (prefix.exists() and not prefix.is_dir()):
        raise NotOurs(f"{prefix} is not a folder; refusing to replace it")
    if prefix.is_dir() and any(prefix.iterdir()):
        if not (prefix / MARKER).is_file():
            raise NotOurs(
                f"{prefix} exists and has no {MARKER} file (dcp-matrix did not make it);"
                " refusing to delete it: remove it yourself or choose another run.torch_env_dir"
            )
        shutil.rmtree(prefix)
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / MARKER).write_text(
        f"made by dcp-matrix (pipeline_lib.plan.torch_envs) for {requirement}\n"
    )
    subprocess.run([sys.executable, "-m", "venv", str(prefix)], check=True)
    pip = [str(prefix / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
    subprocess.run([*pip, requirement, *pinned(JOB_PACKAGES)], check=True)
    subprocess.run([*pip, "--no-deps", "--no-build-isolation", "-e", str(REPO)], check=True)
    freeze = subprocess.run(
        [str(prefix / "bin" / "python"), "-m", "pip", "freeze", "--exclude-editable"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    write_with(prefix / "packages.txt", lambda tmp: Path(tmp).write_text(freeze))
