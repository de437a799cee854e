"""Expand a validated config into cells and jobs: a pure function of the config (no torch).

A cell is (model, save layout, load layout, torch versions, variant of the axes). Jobs: one save
job per (version, variant, model, save layout) and one load job per (version, variant, model,
load layout) that verifies every checkpoint paired with that load layout, so ``pairs: all`` takes
2 x models x layouts torchrun launches per version and variant.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from pipeline_lib import faults, frameworks
from pipeline_lib.axes import DEFAULT, Variant, conflict, layout_conflict, variants
from pipeline_lib.config import config_hash

RESULTS = "results"


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
    # torch environments (config torch_versions); None: the one the pipeline runs in
    save_version: str | None = None
    load_version: str | None = None
    variant: Variant = DEFAULT


def layouts(config: dict) -> dict[str, Layout]:
    result = {}
    for name, spec in config["layouts"].items():
        fw = frameworks.get(spec["framework"])
        result[name] = Layout(name, fw.name, tuple(spec["mesh"]), fw.mesh_dims, fw.tp_dim)
    return result


def layout_pairs(config: dict) -> list[tuple[str, str]]:
    return _pairs(config["pairs"], list(config["layouts"]))


def _pairs(setting, names: list) -> list[tuple]:
    """Ordered (save, load) pairs of ``names`` for a setting: all, same, or an explicit list."""
    if setting == "all":
        return [(s, d) for s in names for d in names]
    if setting == "same":
        return [(n, n) for n in names]
    return [tuple(p) for p in dict.fromkeys(tuple(p) for p in setting)]


def cells(config: dict) -> list[Cell]:
    by_name = layouts(config)
    return [
        Cell(model, by_name[s], by_name[d], sv, lv, variant)
        for variant in variants(config)
        for model in config["models"]
        for sv, lv in version_pairs(config)
        for s, d in layout_pairs(config)
    ]


def torch_versions(config: dict) -> list[str | None]:
    """Named torch environments, or [None]: every job runs in the pipeline's own environment."""
    return list(config["torch_versions"]) or [None]


def version_pairs(config: dict) -> list[tuple[str | None, str | None]]:
    names = torch_versions(config)
    return [(None, None)] if names == [None] else _pairs(config["version_pairs"], names)


def job_root(version: str | None, variant: Variant = DEFAULT) -> str:
    """Where the jobs of one torch environment and variant write (the pipeline's own torch and
    the default variant keep the plain layout)."""
    root = RESULTS if version is None else f"{RESULTS}/torch/{version}"
    return f"{root}/axes/{variant.id}" if variant.id else root


def job_roots(config: dict) -> dict[str, tuple[str | None, Variant]]:
    """Every job root of the grid -> (torch version, variant)."""
    return {
        job_root(version, variant): (version, variant)
        for version in torch_versions(config)
        for variant in variants(config)
    }


def env_dir(config: dict, version: str) -> str:
    return f"{config['run']['torch_env_dir']}/{version}"


def env_python(config: dict, version: str) -> str:
    return f"{env_dir(config, version)}/bin/python"


def env_marker(config: dict, version: str) -> str:
    """The environment's exact package list, written last when it is built."""
    return f"{env_dir(config, version)}/packages.txt"


def save_jobs(config: dict) -> list[tuple[str, str, str]]:
    """(job root, model, layout) of every save job."""
    return _jobs(config, [s for s, _ in version_pairs(config)], save_layouts(config))


def load_jobs(config: dict) -> list[tuple[str, str, str]]:
    return _jobs(config, [d for _, d in version_pairs(config)], load_layouts(config))


def _jobs(config: dict, versions: list, layout_names: list[str]) -> list[tuple[str, str, str]]:
    return [
        (job_root(v, variant), m, name)
        for v in dict.fromkeys(versions)
        for variant in variants(config)
        for m in config["models"]
        for name in layout_names
    ]


def load_sources(config: dict, layout: str, version: str | None) -> list[tuple[str, str | None]]:
    """(save layout, save torch version) of every checkpoint a load job verifies."""
    return [
        (src, sv)
        for sv, lv in version_pairs(config)
        if lv == version
        for src in sources_of(config, layout)
    ]


def save_layouts(config: dict) -> list[str]:
    return list(dict.fromkeys(s for s, _ in layout_pairs(config)))


def load_layouts(config: dict) -> list[str]:
    return list(dict.fromkeys(d for _, d in layout_pairs(config)))


def sources_of(config: dict, load_layout: str) -> list[str]:
    """Save layouts whose checkpoints the load job of ``load_layout`` verifies."""
    return [s for s, d in layout_pairs(config) if d == load_layout]


def save_dir(model: str, layout: str, root: str = RESULTS) -> str:
    """What a save job leaves behind for the load jobs: the checkpoint and the reference."""
    return f"{root}/save/{model}/{layout}"


def checkpoint_dir(model: str, layout: str, root: str = RESULTS) -> str:
    return f"{save_dir(model, layout, root)}/checkpoint"


def reference_file(model: str, layout: str, root: str = RESULTS) -> str:
    """The saver's in-memory state, entry by entry (torch.save, read with weights_only=True)."""
    return f"{save_dir(model, layout, root)}/reference.pt"


def full_state_file(model: str, layout: str, root: str = RESULTS) -> str:
    """A full state dict written with torch.save (mode full, formats torch_save*)."""
    return f"{save_dir(model, layout, root)}/full_state.pt"


def save_record(model: str, layout: str, root: str = RESULTS) -> str:
    return f"{root}/save/{model}/{layout}.json"


def load_record(model: str, layout: str, root: str = RESULTS) -> str:
    return f"{root}/load/{model}/{layout}.json"


def skip_reason(variant: Variant, side: str, layout: Layout) -> str | None:
    """Why a job cannot run this variant on this layout (its cells are ``skip``), or None."""
    return conflict(variant) or layout_conflict(variant, side, layout.world_size)


def save_spec(
    config: dict, model: str, layout: str, root: str = RESULTS, variant: Variant = DEFAULT
) -> dict:
    """Everything the save job of (model, layout) needs; its JSON is the job's only argument."""
    by_name = layouts(config)
    return {
        "kind": "save",
        "model": model,
        "layout": by_name[layout].to_dict(),
        "variant": variant.to_dict(),
        "skip": skip_reason(variant, "save", by_name[layout]),
        "train": config["train"],
        "run": config["run"],
        "config_hash": config_hash(config),
        "record": save_record(model, layout, root),
        "work_dir": f"{root}/work/save/{model}/{layout}",
        "save_dir": save_dir(model, layout, root),
        "checkpoint": checkpoint_dir(model, layout, root),
        "full_state": full_state_file(model, layout, root),
        "reference": reference_file(model, layout, root),
    }


def load_spec(
    config: dict,
    model: str,
    layout: str,
    sources: list[tuple[str, str | None]] | None = None,
    root: str = RESULTS,
    variant: Variant = DEFAULT,
) -> dict:
    """The load job of (model, layout): it verifies the checkpoint of every source, a (save
    layout, save torch version) pair (default: every one paired with ``layout``)."""
    by_name = layouts(config)
    if sources is None:
        sources = [(src, None) for src in sources_of(config, layout)]
    return {
        "kind": "load",
        "model": model,
        "layout": by_name[layout].to_dict(),
        "variant": variant.to_dict(),
        "skip": skip_reason(variant, "load", by_name[layout]),
        "train": config["train"],
        "verify": config["verify"],
        "run": config["run"],
        "config_hash": config_hash(config),
        "sources": [
            {
                # Unique within the job: the same layout may come from two torch versions.
                "id": src if version is None else f"{version}.{src}",
                "layout": by_name[src].to_dict(),
                "checkpoint": checkpoint_dir(model, src, job_root(version, variant)),
                "full_state": full_state_file(model, src, job_root(version, variant)),
                "save_record": save_record(model, src, job_root(version, variant)),
            }
            for src, version in sources
        ],
        "record": load_record(model, layout, root),
        "work_dir": f"{root}/work/load/{model}/{layout}",
    }


def job_save_spec(config: dict, root: str, model: str, layout: str) -> dict:
    """The save job of (model, layout) under a job root (a torch environment and variant)."""
    version, variant = job_roots(config)[root]
    return {**save_spec(config, model, layout, root, variant), "torch_env": version}


def job_load_spec(config: dict, root: str, model: str, layout: str) -> dict:
    version, variant = job_roots(config)[root]
    sources = load_sources(config, layout, version)
    spec = load_spec(config, model, layout, sources, root, variant)
    return {**spec, "torch_env": version}


def load_inputs(config: dict, root: str, model: str, layout: str) -> list[str]:
    """What the load job under ``root`` reads: the save record and folder of every source."""
    version, variant = job_roots(config)[root]
    return [
        path
        for src, save_version in load_sources(config, layout, version)
        for path in (
            save_record(model, src, job_root(save_version, variant)),
            save_dir(model, src, job_root(save_version, variant)),
        )
    ]


# --- the fault campaign (config key ``faults``) --------------------------------------------


@dataclass(frozen=True)
class FaultCell:
    """One cell broken on purpose: its own save and load job under ``results/faults/<id>``."""

    fault: str
    model: str
    save: str
    load: str

    @property
    def id(self) -> str:
        return f"{self.fault}.{self.model}.{self.save}.{self.load}"

    @property
    def root(self) -> str:
        return f"{RESULTS}/faults/{self.id}"

    @property
    def load_record(self) -> str:
        return f"{self.root}/load.json"

    @property
    def save_model(self) -> str:
        """A foreign_checkpoint cell loads a checkpoint written by another model."""
        return (
            faults.foreign_model(self.model) if self.fault == "foreign_checkpoint" else self.model
        )


def fault_cells(config: dict) -> list[FaultCell]:
    cells = []
    for entry in config["faults"]:
        names = list(faults.FAULTS) if entry["fault"] == "all" else [entry["fault"]]
        cells += [FaultCell(name, entry["model"], entry["save"], entry["load"]) for name in names]
    return list(dict.fromkeys(cells))


def fault_cell(config: dict, fault_id: str) -> FaultCell:
    return next(c for c in fault_cells(config) if c.id == fault_id)


def fault_save_spec(config: dict, cell: FaultCell) -> dict:
    spec = save_spec(config, cell.save_model, cell.save, cell.root)
    if faults.FAULTS[cell.fault].stage in ("checkpoint", "save"):
        spec["fault"] = cell.fault
    return spec


def fault_load_spec(config: dict, cell: FaultCell) -> dict:
    fault = faults.FAULTS[cell.fault]
    spec = load_spec(config, cell.model, cell.load, [(cell.save, None)], cell.root)
    source = spec["sources"][0]
    source.update(
        checkpoint=checkpoint_dir(cell.save_model, cell.save, cell.root),
        save_record=save_record(cell.save_model, cell.save, cell.root),
    )
    if fault.stage == "load":
        source["fault"] = cell.fault
    spec["fault"] = {"name": cell.fault, "expect": fault.expect, "id": cell.id}
    spec["record"] = cell.load_record
    return spec
