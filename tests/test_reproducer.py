"""Issue 18: the standalone reproducer of a non-pass cell, run with torchrun in a fresh folder
(no pipeline_lib), gives the cell's status. Cells known on torch 2.13.0 CPU (docs/findings.md)."""

from __future__ import annotations

import os
import re
import sys

import pytest

from pipeline_lib import config as config_mod
from pipeline_lib import reproducer
from tests import procs
from tests.test_baseline import cell

CONFIG = {
    "models": ["mlp", "tied_embedding"],
    "layouts": {
        "single": {"framework": "single", "mesh": [1]},
        "ddp_2": {"framework": "ddp", "mesh": [2]},
        "fsdp1_2": {"framework": "fsdp1", "mesh": [2]},
    },
    "formats": ["dcp", "safetensors", "safetensors_consolidated"],
    "modes": ["sharded", "full"],
    "combine_axes": "one_at_a_time",
}
CELLS = {
    # rank 0 SIGSEGV in get_state_dict(full_state_dict=True, cpu_offload=True)
    "crash": cell("mlp", save="fsdp1_2", load="single", status="crash", mode="full",
                  reason="save: rank 0 killed by SIGSEGV during state dict"),
    # the consolidated file holds other ranks' 0-dim optimizer step as 0
    "fail": cell("mlp", save="ddp_2", load="single", status="fail",
                 format="safetensors_consolidated",
                 reason="files vs saver: 10 of 40 entries differ; first "
                        "optim.state.blocks.0.fc1.bias.step: bytes differ (max_abs_diff 2)"),
    # HuggingFaceStorageWriter refuses tensors that share memory
    "error": cell("tied_embedding", save="single", load="single", status="error",
                  format="safetensors", reason="save: CheckpointException on rank(s) [0]: "
                  "RuntimeError: Some tensors share memory"),
}  # fmt: skip


def test_reproducer_is_standalone():
    config = config_mod.validate(CONFIG)
    for row in CELLS.values():
        text = reproducer.script({**row, "device": "cpu"}, config)
        assert not re.search(r"^\s*(from|import) pipeline_lib", text, flags=re.MULTILINE)
        compile(text, "repro.py", "exec")
        readme = reproducer.readme({**row, "device": "cpu"}, config)
        assert "torchrun --standalone --nproc-per-node" in readme


@pytest.mark.torchrun
@pytest.mark.parametrize("status", ["crash", "fail", "error"])
def test_reproducer_reproduces_the_status(tmp_path, status):
    config = config_mod.validate(CONFIG)
    row = {**CELLS[status], "device": "cpu"}
    written = reproducer.write_all(
        __import__("pandas").DataFrame([row]), config, str(tmp_path / "reproducers")
    )
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "repro.py").write_text((written[0] / "repro.py").read_text())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = procs.run(
        [sys.executable, "repro.py"], cwd=fresh, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    line = next((x for x in proc.stdout.splitlines() if x.startswith("STATUS: ")), "")
    assert line.startswith(f"STATUS: {status}: "), proc.stdout + proc.stderr[-3000:]
    if status == "crash":
        assert "rank 0 killed by SIGSEGV" in line
    elif status == "fail":
        assert re.search(r"optim\.state\.\S+\.step: bytes differ", line)
    else:
        assert "share memory" in line
