"""The typed results and records (docs: glossary): what a job's ranks report of a unit and
what its driver writes from them, read by the verdict (pipeline_lib.verify.records), the
aggregate and the fault campaign (pipeline_lib.results).

- ``SaveResult``: what a save item's rank 0 writes (``results/<unit>.json``), or the driver for
  an item that did not finish; ``SaveRecord``: the save job's record of the item (the result,
  and where the checkpoint is); ``ImportRecord``: an existing checkpoint's import record, in a
  save record's place.
- ``LoadResult``: what a load cell's rank 0 writes; ``LoadRecord``: the load job's record of an
  item, its cells' matrix rows and tensor rows (the verdict already in them; one cell's:
  ``CellRows``).
- ``EntryComparison``: one entry in one check (checks 0-2 give one per entry); ``CheckResult``:
  a named check of a save sequence; ``EntryInfo``: an entry's kind, dtype and shape.

Each has a JSON round trip (``to_dict`` / ``from_dict``): the fields are the keys; a result or
record leaves out a field that is None (a failed unit holds status and reason only); an
unknown or missing key is an error naming it (common.json_form). The forms are checked against
tests/schemas/*_record.json and *_result.json. Pure (no torch), plain dataclasses (a reproducer
copies them).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from typing import Any, ClassVar

from pipeline_lib.common.json_form import checked_keys
from pipeline_lib.common.layout import Layout


def _json(value: Any) -> Any:
    """``value`` as JSON data: a typed value's ``to_dict``, containers item by item."""
    if is_dataclass(value):
        return value.to_dict()
    if isinstance(value, dict):
        return {key: _json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json(item) for item in value]
    return value


def _whole(obj) -> dict:
    """The JSON form of a value type: every field."""
    return {f.name: _json(getattr(obj, f.name)) for f in fields(obj)}


def _present(obj) -> dict:
    """The JSON form of a result or record: its fields, less those that are None."""
    values = ((f.name, getattr(obj, f.name)) for f in fields(obj))
    return {name: _json(value) for name, value in values if value is not None}


def _typed(cls, data: dict, parse: dict, every: bool = False) -> Any:
    """``cls`` from its JSON form: ``parse``: field -> the function that reads its value;
    ``every``: every field is a key (else those without a default)."""
    data = checked_keys(cls, data, every=every)
    return cls(**{k: parse[k](v) if k in parse and v is not None else v for k, v in data.items()})


@dataclass(frozen=True)
class EntryComparison:
    """One entry in one check: equal bit for bit, the largest absolute difference where both
    sides are tensors of one dtype and shape (informative), and what differs."""

    equal: bool
    max_abs_diff: float | None
    note: str = ""

    def to_dict(self) -> dict:
        return _whole(self)

    @classmethod
    def from_dict(cls, data: dict) -> EntryComparison:
        return cls(**checked_keys(cls, data, every=True))


def comparisons(data: dict) -> dict[str, EntryComparison]:
    """A check's comparisons (entry name -> EntryComparison) from their JSON form."""
    return {name: EntryComparison.from_dict(found) for name, found in data.items()}


@dataclass(frozen=True)
class CheckResult:
    """One more check of a save sequence (SaveResult.sequence): its name as the reason gives
    it, its comparisons, or why it could not run."""

    check: str
    entries: dict[str, EntryComparison]
    error: str = ""

    def to_dict(self) -> dict:
        return _whole(self)

    @classmethod
    def from_dict(cls, data: dict) -> CheckResult:
        return _typed(cls, data, {"entries": comparisons}, every=True)


@dataclass(frozen=True)
class EntryInfo:
    """An entry of a saved state: its kind (param, optim.step, ...), dtype (a non-tensor's
    Python type) and shape (None for a non-tensor)."""

    kind: str
    dtype: str
    shape: list[int] | None

    def to_dict(self) -> dict:
        return _whole(self)

    @classmethod
    def from_dict(cls, data: dict) -> EntryInfo:
        return cls(**checked_keys(cls, data, every=True))


def entry_infos(data: dict) -> dict[str, EntryInfo]:
    return {name: EntryInfo.from_dict(info) for name, info in data.items()}


@dataclass(frozen=True)
class ExportCheck:
    """Format hf_export: whether the export loads with from_pretrained equal to the saver
    ("" reason) or why not (pipeline_lib.job.hf_export)."""

    loads: bool
    reason: str = ""

    def to_dict(self) -> dict:
        return _whole(self)

    @classmethod
    def from_dict(cls, data: dict) -> ExportCheck:
        return cls(**checked_keys(cls, data, every=True))


@dataclass(frozen=True)
class FaultTag:
    """A fault-campaign load item's account of its fault (its spec's, and its record's: the
    campaign's verdict reads it, pipeline_lib.results.selftest)."""

    name: str
    expect: str
    id: str

    def to_dict(self) -> dict:
        return _whole(self)

    @classmethod
    def from_dict(cls, data: dict) -> FaultTag:
        return cls(**checked_keys(cls, data, every=True))


@dataclass
class Timing:
    """The seconds each phase of a unit took (``<phase>_s``), set as the phase ends
    (pipeline_lib.job.worker.timed); a phase that did not run is None (not in the JSON)."""

    startup_s: float | None = None  # the job's launch until its ranks began the unit's item
    build_s: float | None = None
    train_s: float | None = None
    reference_s: float | None = None
    state_check_s: float | None = None
    save_blocked_s: float | None = None  # the training loop blocked by the save
    save_s: float | None = None  # until the checkpoint was written (an async save: later)
    hf_export_s: float | None = None
    seal_s: float | None = None  # save side: sealing; load side: checking the seal
    files_check_s: float | None = None
    convert_s: float | None = None
    load_s: float | None = None
    verify_s: float | None = None
    resume_s: float | None = None

    def add(self, other: Timing) -> None:
        """Take every phase ``other`` timed."""
        for f in fields(other):
            if (seconds := getattr(other, f.name)) is not None:
                setattr(self, f.name, seconds)

    def to_dict(self) -> dict:
        return _present(self)

    @classmethod
    def from_dict(cls, data: dict) -> Timing:
        return cls(**checked_keys(cls, data))


@dataclass(frozen=True)
class Env:
    """Where a job's ranks ran: versions, process group backend, device, host, and how the
    ranks started (``forkserver`` or ``exec``: pipeline_lib.job.launcher)."""

    torch_version: str
    python_version: str
    backend: str
    device: str
    hostname: str
    threads_per_rank: int
    rank_start: str

    def to_dict(self) -> dict:
        return _whole(self)

    @classmethod
    def from_dict(cls, data: dict) -> Env:
        return cls(**checked_keys(cls, data, every=True))


# --- save side -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SaveResult:
    """A save item's result: status ``ok`` with every fact the save gathered, or ``skip``,
    ``error``, ``crash``, ``timeout`` and why (then the facts are None)."""

    status: str
    reason: str
    # check 0 (the saver's state dict vs its live state), check 1 (the files vs the saver's
    # reference), or why check 1 could not read the files
    state_check: dict[str, EntryComparison] | None = None
    files_check: dict[str, EntryComparison] | None = None
    files_error: str | None = None
    hf_export: ExportCheck | None = None  # format hf_export
    fault_applied: str | None = None  # the campaign's checkpoint fault: what it changed
    train_losses: list[float] | None = None
    resume_losses: list[float] | None = None  # the saver's own, after the save
    loss_source: str | None = None  # model, user or fallback (pipeline_lib.models._user)
    entries: dict[str, EntryInfo] | None = None  # the saved state's (tensors.parquet)
    # The entries the saver left out and added on purpose (load modes strict, non_strict, ...).
    dropped_entries: list[str] | None = None
    added_entries: list[str] | None = None
    # ignore_frozen_params: frozen parameters found in the saved state (none may be).
    frozen_saved: list[str] | None = None
    timing: Timing | None = None
    peak_rss_mb: float | None = None
    env: Env | None = None
    # A save sequence: the step of the checkpoint the cells load, every step saved, and the
    # checks of the other checkpoints and of consecutive ones.
    save_step: int | None = None
    save_steps: list[int] | None = None
    sequence: list[CheckResult] | None = None

    PARSE: ClassVar[dict] = {
        "state_check": comparisons,
        "files_check": comparisons,
        "hf_export": ExportCheck.from_dict,
        "entries": entry_infos,
        "env": Env.from_dict,
        "timing": Timing.from_dict,
        "sequence": lambda checks: [CheckResult.from_dict(c) for c in checks],
    }

    def to_dict(self) -> dict:
        return _present(self)

    @classmethod
    def from_dict(cls, data: dict):
        return _typed(cls, data, cls.PARSE)


@dataclass(frozen=True, kw_only=True)
class SaveRecord(SaveResult):
    """The save job's record of one item (``save/<model>/<layout>.json``): its result, and
    what it saved where; the checkpoint's size when the item ran to its end."""

    model: str
    layout: Layout
    checkpoint: str
    reference: str
    config_hash: str
    created_at: str
    torch_version: str
    checkpoint_bytes: int | None = None
    checkpoint_files: int | None = None

    PARSE: ClassVar[dict] = {**SaveResult.PARSE, "layout": Layout.from_dict}

    @classmethod
    def of(cls, result: SaveResult, **where) -> SaveRecord:
        """The record of ``result`` with ``where``: the fields a result does not have."""
        return cls(**{f.name: getattr(result, f.name) for f in fields(SaveResult)}, **where)


@dataclass(frozen=True, kw_only=True)
class ImportRecord(SaveRecord):
    """The import job's record of an existing checkpoint (``existing/<name>/record.json``),
    which stands in its load cells for the save record: the files are the reference, so
    checks 0 and 1 and the saver's losses are empty (pipeline_lib.job.existing)."""

    existing: bool = True
    source_folder: str
    metadata_sha256: str | None = None  # of .metadata (a Hugging Face folder: of its files)
    writer_manifest: dict | None = None  # the writer's own account of the checkpoint
    format: str | None = None  # hf_safetensors; None: dcp
    files: list[str] | None = None  # a Hugging Face folder's files
    config_json: dict | None = None  # a Hugging Face folder's config.json, summed up
    excluded_entries: list[str] | None = None  # the naming's: not this tool's state
    unplaced_entries: list[str] | None = None  # no place in the model: kept under their names
    tied_entries: dict[str, str] | None = None  # a Hugging Face folder's: alias -> first name
    flattened_optim: bool | None = None  # the optimizer entries are FSDP1's flattened ones
    model_only: bool | None = None  # model entries only: the cells compare the model's
    uncompared: str | None = None  # the loader's entries it has none of by design, and why


# --- load side -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class LoadResult:
    """A load cell's result: status ``ok`` with check 2 and the resume, or ``skip``,
    ``not_run`` (its save failed), ``error``, ``crash``, ``timeout`` and why."""

    status: str
    reason: str
    entries: dict[str, EntryComparison] | None = None  # check 2 (loader vs saver)
    # A non-strict load's account; an existing checkpoint's entries it has none of by design.
    missing_entries: list[str] | None = None
    unexpected_entries: list[str] | None = None
    uncompared_entries: list[str] | None = None
    strict_error: str | None = None  # the strict load's expected failure (modes strict, ...)
    resume_losses: list[float] | None = None
    # fresh: a checkpoint of model weights only, the resume made a new optimizer; or loaded.
    resume_optimizer: str | None = None
    # Sealed mode: the seal held (False: seal_error says what changed; nothing was loaded).
    seal_ok: bool | None = None
    seal_error: str | None = None
    timing: Timing | None = None
    peak_rss_mb: float | None = None
    env: Env | None = None
    created_at: str | None = None

    def to_dict(self) -> dict:
        return _present(self)

    @classmethod
    def from_dict(cls, data: dict) -> LoadResult:
        parse = {"entries": comparisons, "env": Env.from_dict, "timing": Timing.from_dict}
        return _typed(cls, data, parse)


def result_type(kind: str) -> type[SaveResult] | type[LoadResult]:
    """The result a job of ``kind`` (save or load) reports of each of its units."""
    return SaveResult if kind == "save" else LoadResult


@dataclass(frozen=True)
class CellRows:
    """One cell's rows in its load record: its matrix row (the verdict in it) and its tensor
    rows (pipeline_lib.verify.records.cell_row, tensor_rows); what the reuse store keeps of a
    cell."""

    cell: dict[str, Any]
    tensors: list[dict[str, Any]]

    def to_dict(self) -> dict:
        return _whole(self)

    @classmethod
    def from_dict(cls, data: dict) -> CellRows:
        return cls(**checked_keys(cls, data, every=True))


@dataclass(frozen=True)
class LoadRecord:
    """The load job's record of one item (``load/<model>/<layout>.json``): a matrix row per
    cell (the verdict in it) and the tensor rows of every cell (the Parquet schemas'
    columns, pipeline_lib.verify.records), the job's launches, and the campaign's fault."""

    cells: list[dict[str, Any]]
    tensors: list[dict[str, Any]]
    launches: int
    fault: FaultTag | None = None

    def to_dict(self) -> dict:
        return _present(self)

    @classmethod
    def from_dict(cls, data: dict) -> LoadRecord:
        return _typed(cls, data, {"fault": FaultTag.from_dict})
