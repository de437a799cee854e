"""The typed data a job's driver hands its worker ranks (docs: glossary): a ``JobSpec`` (one
torchrun launch) runs ``ItemSpec``s (one (variant, model) each); a load item verifies one
checkpoint per ``Source``. Every path of a saved checkpoint comes from one ``CheckpointPaths``.
Each has a JSON round trip (``to_dict`` / ``from_dict``) in the form pipeline_lib.plan.grid writes;
an unknown or missing key is an error naming it. Pure (no torch).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from pipeline_lib.common.layout import Layout
from pipeline_lib.plan.axes import Variant
from pipeline_lib.verify.results import FaultTag


class SpecError(ValueError):
    """A job spec that does not have the form grid writes."""


def _take(data: dict, cls, *, rename: dict[str, str] | None = None) -> dict:
    """The keyword arguments of ``cls`` from ``data``: every key must be a field."""
    rename = rename or {}
    known = {f.name for f in fields(cls)} | set(rename)
    unknown = sorted(set(data) - known)
    if unknown:
        raise SpecError(f"{cls.__name__}: unknown key(s) {', '.join(unknown)}")
    return {rename.get(k, k): v for k, v in data.items()}


@dataclass(frozen=True)
class CheckpointPaths:
    """Where one save item writes, and where a load cell reads it from."""

    checkpoint: str  # the DCP folder (or HuggingFace safetensors folder)
    full_state: str  # a full state dict written with torch.save (mode full, torch_save*)
    reference: str  # the saver's reference: one file per rank (pipeline_lib.verify.reference)

    def read_by(self, variant: Variant) -> str:
        """What a load of ``variant`` reads: the full state file or the checkpoint folder."""
        return self.full_state if variant.reads_full_state else self.checkpoint

    @classmethod
    def pop_from(cls, data: dict) -> CheckpointPaths:
        return cls(data.pop("checkpoint"), data.pop("full_state"), data.pop("reference"))


@dataclass(frozen=True)
class Source:
    """A checkpoint a load item verifies: a save layout (and save torch version)."""

    id: str  # unique within the job: "<layout>" or "<torch version>.<layout>"
    layout: Layout
    paths: CheckpointPaths
    save_record: str
    fault: str | None = None  # a load- or state-stage fault of the campaign
    # An existing checkpoint (config key checkpoints): how its entry names map to ours
    # (pipeline_lib.verify.checkpoint_names); None for a checkpoint this config's save job writes.
    naming: str | None = None
    # An existing checkpoint's format other than dcp: hf_safetensors
    # (pipeline_lib.verify.hf_folder).
    format: str | None = None

    @classmethod
    def from_dict(cls, data: dict) -> Source:
        data = dict(data)
        paths = CheckpointPaths.pop_from(data)
        data["layout"] = Layout.from_dict(data["layout"])
        return cls(paths=paths, **_take(data, cls))

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "paths"}
        data["layout"] = self.layout.to_dict()
        return {**{k: v for k, v in data.items() if v is not None}, **asdict(self.paths)}


@dataclass(frozen=True)
class ExistingSpec:
    """The import job of an existing checkpoint (config key ``checkpoints``): read ``path``
    without a process group into the reference of its load cells (pipeline_lib.job.existing)."""

    name: str
    path: str  # the checkpoint's folder, written anywhere by anything
    model: str
    naming: str
    save_dir: str  # what the import job writes: the reference folder below it, and the record
    reference: str
    record: str
    config_hash: str
    model_kwargs: dict = field(default_factory=dict)  # an hf_models entry
    reuse_dir: str | None = None  # the reuse store (pipeline_lib.job.reuse); None: always import
    format: str = "dcp"  # or hf_safetensors: a Hugging Face folder (pipeline_lib.verify.hf_folder)
    manifest: str | None = None  # the writer's own account of the checkpoint (JSON), if any

    @classmethod
    def from_dict(cls, data: dict) -> ExistingSpec:
        return cls(**_take(data, cls))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ItemSpec:
    """One (variant, model) of a job: a save item writes ``paths``; a load item verifies every
    one of its ``sources``."""

    kind: str  # save or load
    id: str  # its index in the job
    model: str
    layout: Layout
    variant: Variant
    skip: str | None  # why the variant cannot run on this layout (every unit is ``skip``)
    train: dict
    run: dict
    config_hash: str
    record: str
    paths: CheckpointPaths | None = None  # save items
    save_dir: str | None = None  # save items: the folder holding paths
    sources: tuple[Source, ...] = ()  # load items
    verify: dict = field(default_factory=dict)  # config key verify (resume_rtol, reference)
    fault: str | None = None  # save items: the campaign's fault
    fault_tag: FaultTag | None = None  # load items of the campaign
    model_kwargs: dict = field(default_factory=dict)  # benchmarks: resize a model

    @classmethod
    def from_dict(cls, data: dict) -> ItemSpec:
        data = dict(data)
        if data.get("kind") == "save":
            data["paths"] = CheckpointPaths.pop_from(data)
        else:
            data["sources"] = tuple(Source.from_dict(s) for s in data.get("sources", ()))
            if isinstance(data.get("fault"), dict):
                data["fault_tag"] = FaultTag.from_dict(data.pop("fault"))
        data["variant"] = Variant(**data["variant"])
        data["layout"] = Layout.from_dict(data["layout"])
        return cls(**_take(data, cls))

    def to_dict(self) -> dict:
        data: dict[str, Any] = {
            "kind": self.kind,
            "id": self.id,
            "model": self.model,
            "layout": self.layout.to_dict(),
            "variant": self.variant.to_dict(),
            "skip": self.skip,
            "train": self.train,
            "run": self.run,
            "config_hash": self.config_hash,
            "record": self.record,
        }
        if self.kind == "save":
            data.update(save_dir=self.save_dir, verify=self.verify, **asdict(self.paths))
            if self.fault is not None:
                data["fault"] = self.fault
        else:
            data.update(verify=self.verify, sources=[s.to_dict() for s in self.sources])
            if self.fault_tag is not None:
                data["fault"] = self.fault_tag.to_dict()
        if self.model_kwargs:
            data["model_kwargs"] = self.model_kwargs
        return data

    def unit(self, source: Source | None = None) -> str:
        """The unit id of this save item, or of the load cell of ``source``."""
        return unit_id(self.id, source.id if source else None)


def unit_id(item_id: str, source_id: str | None = None) -> str:
    """A unit: a save item (its id), or a load cell (item id . source id)."""
    return item_id if source_id is None else f"{item_id}.{source_id}"


@dataclass(frozen=True)
class JobSpec:
    """One torchrun launch of ``layout`` running ``items`` in order."""

    kind: str  # save or load
    layout: Layout
    run: dict
    work_dir: str
    items: tuple[ItemSpec, ...]
    torch_env: str | None = None  # the torch_versions environment (None: the pipeline's own)
    launched_at: float | None = None  # set by the driver when it starts the ranks
    # Where the job keeps what it may reuse on a rerun (pipeline_lib.job.reuse); None: run all.
    reuse_dir: str | None = None

    @classmethod
    def from_dict(cls, data: dict) -> JobSpec:
        data = dict(data)
        data["items"] = tuple(ItemSpec.from_dict(item) for item in data["items"])
        data["layout"] = Layout.from_dict(data["layout"])
        return cls(**_take(data, cls))

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["items"] = [item.to_dict() for item in self.items]
        data["layout"] = self.layout.to_dict()
        return {k: v for k, v in data.items() if v is not None}

    def narrowed(self, units: set[str]) -> JobSpec:
        """The job with only ``units``: items of a save job, cells (item.source) of a load job;
        an item left without a unit is left out."""
        if self.kind == "save":
            return replace(self, items=tuple(i for i in self.items if i.unit() in units))
        items = []
        for item in self.items:
            sources = tuple(s for s in item.sources if item.unit(s) in units)
            if sources:
                items.append(replace(item, sources=sources))
        return replace(self, items=tuple(items))

    def units(self) -> list[str]:
        """Every unit of the job: its save items, or its load cells."""
        if self.kind == "save":
            return [item.unit() for item in self.items]
        return [item.unit(source) for item in self.items for source in item.sources]
