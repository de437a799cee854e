"""Expand a validated config into cells and jobs: a pure function of the config (no torch).

A cell is (model, save layout, load layout). Jobs: one save job per (model, save layout) and one
load job per (model, load layout) that verifies every checkpoint paired with that load layout, so
``pairs: all`` takes 2 x models x layouts torchrun launches.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath

from pipeline_lib import frameworks
from pipeline_lib.config import config_hash

RESULTS = PurePosixPath("results")


@dataclass(frozen=True)
class Layout:
    name: str
    framework: str
    mesh: tuple[int, ...]
    mesh_dims: tuple[str, ...]
    tp_dim: str | None

    @property
    def world_size(self) -> int:
        return math.prod(self.mesh)

    @property
    def tp_degree(self) -> int:
        return dict(zip(self.mesh_dims, self.mesh, strict=True))[self.tp_dim] if self.tp_dim else 1

    @property
    def mesh_label(self) -> str:
        return "x".join(map(str, self.mesh))

    def to_dict(self) -> dict:
        return {**asdict(self), "world_size": self.world_size}


@dataclass(frozen=True)
class Cell:
    model: str
    save: Layout
    load: Layout


def layouts(config: dict) -> dict[str, Layout]:
    result = {}
    for name, spec in config["layouts"].items():
        fw = frameworks.get(spec["framework"])
        result[name] = Layout(name, fw.name, tuple(spec["mesh"]), fw.mesh_dims, fw.tp_dim)
    return result


def layout_pairs(config: dict) -> list[tuple[str, str]]:
    names = list(config["layouts"])
    pairs = config["pairs"]
    if pairs == "all":
        return [(s, d) for s in names for d in names]
    if pairs == "same":
        return [(n, n) for n in names]
    return [tuple(p) for p in dict.fromkeys(tuple(p) for p in pairs)]


def cells(config: dict) -> list[Cell]:
    by_name = layouts(config)
    return [
        Cell(model, by_name[s], by_name[d])
        for model in config["models"]
        for s, d in layout_pairs(config)
    ]


def save_layouts(config: dict) -> list[str]:
    return list(dict.fromkeys(s for s, _ in layout_pairs(config)))


def load_layouts(config: dict) -> list[str]:
    return list(dict.fromkeys(d for _, d in layout_pairs(config)))


def sources_of(config: dict, load_layout: str) -> list[str]:
    """Save layouts whose checkpoints the load job of ``load_layout`` verifies."""
    return [s for s, d in layout_pairs(config) if d == load_layout]


def save_dir(model: str, layout: str) -> str:
    """What a save job leaves behind for the load jobs: the checkpoint and the reference."""
    return str(RESULTS / "save" / model / layout)


def checkpoint_dir(model: str, layout: str) -> str:
    return str(PurePosixPath(save_dir(model, layout)) / "checkpoint")


def save_record(model: str, layout: str) -> str:
    return str(RESULTS / "save" / model / f"{layout}.json")


def reference_file(model: str, layout: str) -> str:
    """The saver's in-memory state, entry by entry (torch.save, read with weights_only=True)."""
    return str(PurePosixPath(save_dir(model, layout)) / "reference.pt")


def load_record(model: str, layout: str) -> str:
    return str(RESULTS / "load" / model / f"{layout}.json")


def save_spec(config: dict, model: str, layout: str) -> dict:
    """Everything the save job of (model, layout) needs; its JSON is the job's only argument."""
    return {
        "kind": "save",
        "model": model,
        "layout": layouts(config)[layout].to_dict(),
        "train": config["train"],
        "run": config["run"],
        "config_hash": config_hash(config),
        "checkpoint": checkpoint_dir(model, layout),
        "record": save_record(model, layout),
        "save_dir": save_dir(model, layout),
        "reference": reference_file(model, layout),
    }


def load_spec(config: dict, model: str, layout: str) -> dict:
    by_name = layouts(config)
    return {
        "kind": "load",
        "model": model,
        "layout": by_name[layout].to_dict(),
        "train": config["train"],
        "verify": config["verify"],
        "run": config["run"],
        "config_hash": config_hash(config),
        "sources": [
            {
                "layout": by_name[src].to_dict(),
                "checkpoint": checkpoint_dir(model, src),
                "save_record": save_record(model, src),
            }
            for src in sources_of(config, layout)
        ],
        "record": load_record(model, layout),
    }
