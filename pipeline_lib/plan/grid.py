"""Expand a validated config into cells and jobs: a pure function of the config (no torch).

A cell is (model, save layout, load layout, torch versions, variant of the axes). A job is one
torchrun launch: one save job per (torch version, save layout) and one load job per (torch
version, load layout). Its items are every (variant, model) of the grid: a save job writes their
checkpoints one after the other, a load job verifies every checkpoint paired with its layout, so
``pairs: all`` takes 2 x layouts launches per torch version, whatever the models and axes. (The
start-up of a launch costs more than most of its cells.)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

from pipeline_lib import frameworks, models
from pipeline_lib.common import name_rule
from pipeline_lib.common.layout import Layout
from pipeline_lib.plan.axes import DEFAULT, Variant, conflict, layout_conflict, variants
from pipeline_lib.plan.schema import config_hash
from pipeline_lib.plan.specs import (
    CheckpointPaths,
    ExistingSpec,
    FaultTag,
    ItemSpec,
    JobSpec,
    Source,
)
from pipeline_lib.verify import faults

RESULTS = "results"


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
        if fw.pp_dim:
            result[name] = replace(
                result[name],
                schedule=spec.get("schedule", frameworks.DEFAULT_PP_SCHEDULE),
                microbatches=spec.get("microbatches", frameworks.DEFAULT_MICROBATCHES),
            )
    return result


def layout_pairs(config: dict) -> list[tuple[str, str]]:
    return _pairs(config["pairs"], list(config["layouts"]))


def _pairs(setting, names: list) -> list[tuple]:
    """Ordered (save, load) pairs of ``names`` for a setting: all, same, none (no save jobs:
    only existing checkpoints are loaded), or an explicit list."""
    if setting == "none":
        return []
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


def version_root(version: str | None) -> str:
    """Where the jobs of one torch environment write (the pipeline's own: results/)."""
    return RESULTS if version is None else f"{RESULTS}/torch/{version}"


def version_roots(config: dict) -> dict[str, str | None]:
    """Every version root of the grid -> its torch version."""
    return {version_root(version): version for version in torch_versions(config)}


# A folder name holds at most 255 bytes (most file systems): a longer variant id, many axes
# off their defaults, keeps its first part and a digest of the whole id (unique; every record
# holds the variant's values themselves).
FOLDER_MAX = 255


def variant_folder(variant_id: str) -> str:
    """The folder name of a variant id: the id itself, or within FOLDER_MAX its start and
    ``+id-`` and 16 hex digits of its SHA-256."""
    if len(variant_id) <= FOLDER_MAX:
        return variant_id
    digest = hashlib.sha256(variant_id.encode()).hexdigest()[:16]
    return f"{variant_id[: FOLDER_MAX - len(digest) - 4]}+id-{digest}"


def variant_dir(variant: Variant) -> str:
    """A variant's folder below its version root ('' for the default variant)."""
    if not variant.id:
        return ""
    folder = variant_folder(variant.id)
    if error := name_rule.variant_id_error(folder):
        raise ValueError(error)
    return f"/axes/{folder}"


def job_root(version: str | None, variant: Variant = DEFAULT) -> str:
    """Where the items of one torch environment and variant write (the pipeline's own torch and
    the default variant keep the plain layout)."""
    return version_root(version) + variant_dir(variant)


def env_dir(config: dict, version: str) -> str:
    return f"{config['run']['torch_env_dir']}/{version}"


def env_python(config: dict, version: str) -> str:
    return f"{env_dir(config, version)}/bin/python"


def env_marker(config: dict, version: str) -> str:
    """The environment's exact package list, written last when it is built."""
    return f"{env_dir(config, version)}/packages.txt"


def save_jobs(config: dict) -> list[tuple[str, str]]:
    """(version root, layout) of every save job."""
    return _jobs([s for s, _ in version_pairs(config)], save_layouts(config))


def load_jobs(config: dict) -> list[tuple[str, str]]:
    return _jobs([d for _, d in version_pairs(config)], load_layouts(config))


def _jobs(versions: list, layout_names: list[str]) -> list[tuple[str, str]]:
    return [(version_root(v), name) for v in dict.fromkeys(versions) for name in layout_names]


def items(config: dict) -> list[tuple[Variant, str]]:
    """(variant, model) of every item of a job, in the order the job runs them."""
    return [(variant, model) for variant in variants(config) for model in config["models"]]


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
    """Layouts of load jobs: those ``pairs`` loads under, and every layout when the config
    names existing checkpoints (each is loaded under every layout)."""
    if config["checkpoints"]:
        return list(config["layouts"])
    return list(dict.fromkeys(d for _, d in layout_pairs(config)))


def sources_of(config: dict, load_layout: str) -> list[str]:
    """Save layouts whose checkpoints the load job of ``load_layout`` verifies."""
    return [s for s, d in layout_pairs(config) if d == load_layout]


def save_dir(model: str, layout: str, root: str = RESULTS) -> str:
    """What a save job leaves behind for the load jobs: the checkpoint and the reference."""
    return f"{root}/save/{model}/{layout}"


def checkpoint_dir(model: str, layout: str, root: str = RESULTS) -> str:
    return f"{save_dir(model, layout, root)}/checkpoint"


def reference_dir(model: str, layout: str, root: str = RESULTS) -> str:
    """The saver's in-memory state: one torch.save file per rank, its own part of each entry
    (pipeline_lib.verify.reference.Reference; read with weights_only=True)."""
    return f"{save_dir(model, layout, root)}/reference"


def full_state_file(model: str, layout: str, root: str = RESULTS) -> str:
    """A full state dict written with torch.save (mode full, formats torch_save*)."""
    return f"{save_dir(model, layout, root)}/full_state.pt"


def save_record_path(model: str, layout: str, root: str = RESULTS) -> str:
    return f"{root}/save/{model}/{layout}.json"


def load_record_path(model: str, layout: str, root: str = RESULTS) -> str:
    return f"{root}/load/{model}/{layout}.json"


def skip_reason(variant: Variant, side: str, layout: Layout) -> str | None:
    """Why a job cannot run this variant on this layout (its cells are ``skip``), or None."""
    return conflict(variant) or layout_conflict(variant, side, layout.world_size, layout.framework)


def _item(config: dict, kind: str, model: str, layout: str, record: str, variant: Variant, **more):
    """An item of a ``kind`` job of ``layout`` (its id is set by job_spec)."""
    on = layouts(config)[layout]
    return ItemSpec(
        kind=kind,
        id="0",
        model=model,
        layout=on,
        variant=variant,
        skip=skip_reason(variant, kind, on),
        train=config["train"],
        run=config["run"],
        config_hash=config_hash(config),
        record=record,
        verify=config["verify"],
        **models.spec_kwargs(config, model),  # an hf_models entry
        **more,
    )


def save_spec(
    config: dict, model: str, layout: str, root: str = RESULTS, variant: Variant = DEFAULT
) -> ItemSpec:
    """Everything a save job needs to save (model, layout) under ``root``: one item."""
    record = save_record_path(model, layout, root)
    return _item(
        config, "save", model, layout, record, variant,
        save_dir=save_dir(model, layout, root), paths=checkpoint_paths(model, layout, root),
    )  # fmt: skip


def checkpoint_paths(model: str, layout: str, root: str = RESULTS) -> CheckpointPaths:
    """Every path of the checkpoint the save item of (model, layout) writes under ``root``."""
    return CheckpointPaths(
        checkpoint=checkpoint_dir(model, layout, root),
        full_state=full_state_file(model, layout, root),
        reference=reference_dir(model, layout, root),
    )


def source(config: dict, model: str, layout: str, root: str, version: str | None) -> Source:
    """The checkpoint of (model, save layout) under ``root`` as a load item verifies it: the
    paths where the save job of this config writes it, not what a record on disk says."""
    return Source(
        # Unique within the job: the same layout may come from two torch versions.
        id=layout if version is None else f"{version}.{layout}",
        layout=layouts(config)[layout],
        paths=checkpoint_paths(model, layout, root),
        save_record=save_record_path(model, layout, root),
    )


def load_spec(
    config: dict,
    model: str,
    layout: str,
    sources: list[tuple[str, str | None]] | None = None,
    root: str = RESULTS,
    variant: Variant = DEFAULT,
) -> ItemSpec:
    """One item of a load job: verify the checkpoint of (model, save layout) for every source,
    a (save layout, save torch version) pair (default: every one paired with ``layout``)."""
    if sources is None:
        sources = [(src, None) for src in sources_of(config, layout)]
    checkpoints = tuple(
        source(config, model, src, job_root(version, variant), version) for src, version in sources
    )
    record = load_record_path(model, layout, root)
    return _item(
        config, "load", model, layout, record, variant,
        sources=checkpoints,
    )  # fmt: skip


def job_spec(
    config: dict, kind: str, layout: str, work_dir: str, items: list[ItemSpec], torch_env=None
) -> JobSpec:
    """One torchrun launch of ``layout`` running ``items`` (save_spec or load_spec) in order;
    an item's ``id`` is its index."""
    return JobSpec(
        kind=kind,
        layout=layouts(config)[layout],
        run=config["run"],
        work_dir=work_dir,
        items=tuple(replace(item, id=str(i)) for i, item in enumerate(items)),
        torch_env=torch_env,
    )


def save_job_spec(config: dict, version_root: str, layout: str) -> JobSpec:
    """The save job of ``layout`` in the torch environment of version root ``version_root``."""
    version = version_roots(config)[version_root]
    specs = [
        save_spec(config, model, layout, job_root(version, variant), variant)
        for variant, model in items(config)
    ]
    work = f"{version_root}/work/save/{layout}"
    job = job_spec(config, "save", layout, work, specs, torch_env=version)
    return replace(job, reuse_dir=reuse_dir(version_root))


def load_job_spec(config: dict, version_root: str, layout: str) -> JobSpec:
    version = version_roots(config)[version_root]
    sources = load_sources(config, layout, version)
    specs = [
        load_spec(config, model, layout, sources, job_root(version, variant), variant)
        for variant, model in items(config)
    ]
    specs = [
        replace(spec, sources=spec.sources + existing_sources(config, spec.model, spec.variant))
        for spec in specs
    ]
    work = f"{version_root}/work/load/{layout}"
    job = job_spec(config, "load", layout, work, specs, torch_env=version)
    return replace(job, reuse_dir=reuse_dir(version_root))


def reuse_dir(version_root: str) -> str:
    """What the matrix jobs of a version root keep for reruns (pipeline_lib.job.reuse)."""
    return f"{version_root}/reuse"


def save_outputs(config: dict, version_root: str, layout: str) -> list[str]:
    """The records a save job writes, one per item. Its save folders are not Snakemake
    outputs: Snakemake would remove them before the job runs, and a rerun keeps the folder of
    every unchanged item (pipeline_lib.job.reuse)."""
    return [
        save_record_path(model, layout, version_root + variant_dir(variant))
        for variant, model in items(config)
    ]


def load_outputs(config: dict, version_root: str, layout: str) -> list[str]:
    """The records a load job writes, one per item."""
    return [
        load_record_path(model, layout, version_root + variant_dir(variant))
        for variant, model in items(config)
    ]


def load_inputs(config: dict, version_root: str, layout: str) -> list[str]:
    """What a load job reads: the save record of every item's every source (it names the
    folder; an existing checkpoint's: its import job's record, which names the reference)."""
    version = version_roots(config)[version_root]
    saved = [
        save_record_path(model, src, job_root(save_version, variant))
        for variant, model in items(config)
        for src, save_version in load_sources(config, layout, version)
    ]
    return saved + [existing_record_path(name) for name in config["checkpoints"]]


# --- existing checkpoints (config key ``checkpoints``) --------------------------------------


def existing_dir(name: str) -> str:
    """What the import job of the existing checkpoint ``name`` writes (not the checkpoint)."""
    return f"{RESULTS}/existing/{name}"


def existing_record_path(name: str) -> str:
    return f"{RESULTS}/existing/{name}.json"


def existing_spec(config: dict, name: str) -> ExistingSpec:
    entry = config["checkpoints"][name]
    return ExistingSpec(
        name=name,
        path=entry["path"],
        model=entry["model"],
        naming=entry["naming"],
        save_dir=existing_dir(name),
        reference=f"{existing_dir(name)}/reference",
        record=existing_record_path(name),
        config_hash=config_hash(config),
        reuse_dir=reuse_dir(RESULTS),
        format=entry["format"],
        manifest=entry.get("manifest"),
        **models.spec_kwargs(config, entry["model"]),
    )


def existing_layout(name: str) -> Layout:
    """An existing checkpoint in the save layout's place (columns save_layout, save_framework):
    its name; the layout that wrote it is not known."""
    return Layout.existing(name)


def existing_conflict(variant: Variant) -> str | None:
    """Why the existing checkpoints are not loaded in items of ``variant`` (None: they are):
    the axes that describe how a checkpoint was written are the checkpoint's own."""
    fixed = {"mode": "sharded", "format": "dcp", "async_save": "sync", "param_dtype": "float32"}
    fixed["save_sequence"] = "once"
    differ = [f"{k} {getattr(variant, k)}" for k, v in fixed.items() if getattr(variant, k) != v]
    return ", ".join(differ) or None


def existing_cell_count(config: dict) -> int:
    """The cells of the existing checkpoints: each applicable item x load job."""
    per_job = sum(len(existing_sources(config, m, v)) for v, m in items(config))
    return per_job * len(load_layouts(config)) * len(torch_versions(config))


def existing_sources(config: dict, model: str, variant: Variant) -> tuple[Source, ...]:
    """The existing checkpoints of ``model`` that a load item of ``variant`` loads."""
    if existing_conflict(variant):
        return ()
    return tuple(
        Source(
            id=name,
            layout=existing_layout(name),
            paths=CheckpointPaths(entry["path"], "", f"{existing_dir(name)}/reference"),
            save_record=existing_record_path(name),
            naming=entry["naming"],
            format=None if entry["format"] == "dcp" else entry["format"],
        )
        for name, entry in config["checkpoints"].items()
        if entry["model"] == model
    )


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
    def load_record_path(self) -> str:
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
        names = faults.campaign(config["verify"]) if entry["fault"] == "all" else [entry["fault"]]
        cells += [FaultCell(name, entry["model"], entry["save"], entry["load"]) for name in names]
    return list(dict.fromkeys(cells))


def fault_cell(config: dict, fault_id: str) -> FaultCell:
    return next(c for c in fault_cells(config) if c.id == fault_id)


def fault_variant(fault: str) -> Variant:
    """The variant a fault's cell runs (the default, but for a fault of one variant only)."""
    return Variant(**dict(faults.FAULTS[fault].axes))


def fault_save_spec(config: dict, cell: FaultCell) -> JobSpec:
    """The save job of a fault cell (one item)."""
    spec = save_spec(config, cell.save_model, cell.save, cell.root, fault_variant(cell.fault))
    if faults.FAULTS[cell.fault].stage in faults.SAVE_STAGES:
        spec = replace(spec, fault=cell.fault)
    return job_spec(config, "save", cell.save, f"{cell.root}/work/save", [spec])


def fault_load_spec(config: dict, cell: FaultCell) -> JobSpec:
    """The load job of a fault cell (one item)."""
    return job_spec(
        config, "load", cell.load, f"{cell.root}/work/load", [_fault_load_item(config, cell)]
    )


def _fault_load_item(config: dict, cell: FaultCell) -> ItemSpec:
    fault = faults.FAULTS[cell.fault]
    variant = fault_variant(cell.fault)
    spec = load_spec(config, cell.model, cell.load, [(cell.save, None)], cell.root, variant)
    (saved,) = spec.sources
    # A foreign_checkpoint cell reads the checkpoint another model saved.
    saved = replace(
        saved,
        paths=checkpoint_paths(cell.save_model, cell.save, cell.root),
        save_record=save_record_path(cell.save_model, cell.save, cell.root),
        fault=cell.fault if fault.stage in ("load", "state") else None,
    )
    return replace(
        spec,
        sources=(saved,),
        fault_tag=FaultTag(cell.fault, fault.expect, cell.id),
        record=cell.load_record_path,
    )
