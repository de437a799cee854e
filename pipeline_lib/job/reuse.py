"""Incremental reruns: a matrix job reuses every unit whose inputs did not change.

A unit's **inputs key** (docs: glossary) is a SHA-256 of what can change its result:

- save item: its spec (model, layout, variant, train, run, paths, ...; not its index in the job
  nor the hash of the whole config), the project's code version and the job's environment;
- load cell: the load item's spec without its other sources, the cell's source, the exact bytes
  of the source's save record (a save item that ran again writes a new record, so every cell of
  its checkpoint runs again), the files the cell reads as they are now (``cell_reads``: the
  folder its save item wrote, and an existing checkpoint's own folder), the code version and
  the environment;
- import of an existing checkpoint: its spec (path, model, naming, ...; not the hash of the
  whole config), the files of the checkpoint's folder, the code version and the environment.

The code version hashes every ``pipeline_lib`` source file; the environment hashes Python's
version and every installed distribution with its version (the job's own interpreter, so a
``torch_versions`` environment is its own). Files are compared by ``manifest``: every file's
name, size, modification and status-change times, and the bytes of the small ones and of DCP's
``.metadata`` (what escapes it: docs/how-it-runs.md, "Reruns: what counts as changed"). Every
key is computed from the files as they are when the job starts, never from a kept answer.

The store is ``<version root>/reuse/`` (JobSpec.reuse_dir), one JSON file per key, never a
Snakemake output, so Snakemake's removal of a job's outputs before it runs leaves it alone: a
save item keeps the exact text of its record and the manifest of its folder; a load cell its
matrix row and tensor rows; a load item the exact text of its record (written again byte for
byte when none of its cells ran); an import the exact text of its record (only an ``ok`` one)
and the manifest of the reference it wrote. A store opened with ``read=False`` (config key
``reuse: false``, or a rule forced by Snakemake) reuses nothing but still keeps what the job
computes, so the store always holds the latest verdict for a key.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline_lib.common.atomic import read_json, write_json
from pipeline_lib.common.fingerprint import code_version, digest, environment
from pipeline_lib.common.json_form import FormError
from pipeline_lib.plan.specs import ExistingSpec, ItemSpec, JobSpec, Source
from pipeline_lib.verify.results import CellRows


def _item_inputs(item: ItemSpec) -> dict:
    """An item's spec without what does not change its result: its index in the job, the hash
    of the whole config, and (load items) the sources, which each cell's key names itself."""
    data = item.to_dict()
    for key in ("id", "config_hash", "sources"):
        data.pop(key, None)
    return data


# A file's bytes go into its manifest up to this size, and DCP's ``.metadata`` whatever its
# size: reading them costs little; a larger file (a shard of a big model) is told by its stat.
DIGEST_UP_TO = 2**20
METADATA = ".metadata"


def manifest(path: str | Path) -> dict[str, list]:
    """Every file at ``path`` (below a folder, or the file itself) as it is now: name relative
    to ``path`` -> [size, modification time ns, status-change time ns, SHA-256 of its bytes
    (None for a file over DIGEST_UP_TO that is not a .metadata)]. Nothing there: {}.

    The status-change time (ctime) is set by the filesystem on every write, rename or
    ``utime``; no call sets it back, so an edit that restores the size and modification time
    still changes it."""
    root = Path(path)
    if root.is_file():
        return {root.name: _file_entry(root)}
    if not root.is_dir():
        return {}
    files = (p for p in sorted(root.rglob("*")) if p.is_file())
    return {str(p.relative_to(root)): _file_entry(p) for p in files}


def _file_entry(path: Path) -> list:
    stat = path.stat()
    digest = None
    if stat.st_size <= DIGEST_UP_TO or path.name == METADATA:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, digest]


def cell_reads(item: ItemSpec, source: Source) -> dict[str, dict[str, list]]:
    """The manifest of everything a load cell of ``item`` reads from ``source``: the folder its
    save item wrote (the checkpoint or full-state file, the seal beside it, the saver's
    reference and reload result; for an existing checkpoint, the folder its import wrote) and
    what the cell loads, when it lies elsewhere (an existing checkpoint's own folder)."""
    saved = os.path.dirname(source.paths.reference)
    loaded = source.paths.read_by(item.variant)
    places = [saved] if Path(loaded).is_relative_to(saved) else [saved, loaded]
    return {place: manifest(place) for place in places}


@dataclass(frozen=True)
class Store:
    """The reuse store of one job (None for jobs that always run: the fault campaign's).
    ``read``: False for a run that reuses nothing; it still keeps what it computes."""

    root: Path
    read: bool = True

    @classmethod
    def of(cls, spec: JobSpec | ExistingSpec, read: bool = True) -> Store | None:
        return None if spec.reuse_dir is None else cls(Path(spec.reuse_dir), read)

    def _key(self, *parts) -> str:
        return digest([code_version(), environment(), *parts])

    def _path(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{key}.json"

    def _read(self, kind: str, key: str) -> dict | None:
        if not self.read:
            return None
        path = self._path(kind, key)
        try:
            return read_json(path)
        except (OSError, ValueError):
            return None

    def _kept_record(self, kind: str, key: str, folder: str) -> str | None:
        """The kept text of a record whose unit wrote ``folder``, if the folder is as the unit
        left it (same manifest); else None."""
        entry = self._read(kind, key)
        if entry is None or entry["manifest"] != manifest(folder):
            return None
        return entry["record"]

    def _keep_record(self, kind: str, key: str, record: str, folder: str) -> None:
        entry = {"record": Path(record).read_text(), "manifest": manifest(folder)}
        write_json(self._path(kind, key), entry)

    # --- save items -------------------------------------------------------------------------
    def save_key(self, item: ItemSpec) -> str:
        return self._key("save", _item_inputs(item))

    def saved_record(self, item: ItemSpec) -> str | None:
        """The exact text of the item's record, when its inputs are unchanged and its folder
        is as the save left it; else None (the item runs)."""
        return self._kept_record("save", self.save_key(item), item.save_dir)

    def keep_saved(self, item: ItemSpec) -> None:
        """After the item's record is written: its text and the manifest of its folder."""
        self._keep_record("save", self.save_key(item), item.record, item.save_dir)

    # --- load cells and items ---------------------------------------------------------------
    def cell_key(self, item: ItemSpec, source: Source) -> str:
        """Computed from the files as they are now (cell_reads), never from a kept answer."""
        save_record = Path(source.save_record).read_bytes()
        record_hash = hashlib.sha256(save_record).hexdigest()
        reads = cell_reads(item, source)
        return self._key("cell", _item_inputs(item), source.to_dict(), record_hash, reads)

    def cell(self, key: str) -> CellRows | None:
        """The rows of an unchanged cell, else None (also for rows of another form: the cell
        runs again)."""
        rows = self._read("cell", key)
        try:
            return None if rows is None else CellRows.from_dict(rows)
        except FormError:
            return None

    def keep_cell(self, key: str, rows: CellRows) -> None:
        write_json(self._path("cell", key), rows.to_dict())

    def record_key(self, item: ItemSpec, cell_keys: list[str]) -> str:
        return self._key("load", _item_inputs(item), cell_keys)

    def load_record(self, key: str) -> str | None:
        entry = self._read("load", key)
        return None if entry is None else entry["record"]

    def keep_load_record(self, key: str, item: ItemSpec) -> None:
        write_json(self._path("load", key), {"record": Path(item.record).read_text()})

    # --- imports of existing checkpoints ----------------------------------------------------
    def import_key(self, spec: ExistingSpec) -> str:
        inputs = {k: v for k, v in spec.to_dict().items() if k not in ("config_hash", "reuse_dir")}
        return self._key("import", inputs, manifest(spec.path))

    def imported_record(self, spec: ExistingSpec) -> str | None:
        """The exact text of the import's record, when its inputs (the checkpoint's files
        among them) are unchanged and its reference is as the import left it; else None."""
        return self._kept_record("import", self.import_key(spec), spec.reference)

    def keep_imported(self, spec: ExistingSpec) -> None:
        """After an ``ok`` record is written: its text and the manifest of the reference."""
        self._keep_record("import", self.import_key(spec), spec.record, spec.reference)


def announce(kind: str, reused: int, total: int, store: Store | None = None) -> None:
    """The job log's account of reuse (one line)."""
    why = "inputs unchanged" if store is None or store.read else "reuse off for this run"
    print(
        f"dcp-matrix: reused {reused} of {total} {kind} ({why}); {total - reused} to run",
        flush=True,
    )
