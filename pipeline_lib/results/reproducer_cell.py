"""What a reproducer script holds of its cell (its ``CELL``): written by
pipeline_lib.results.reproducer, read by the script's pipeline_lib.results.reproducer_run.main.
Torch-free (the reproducers rule imports it; reproducer_run imports the job wing)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from pipeline_lib.common.json_form import checked_keys
from pipeline_lib.plan.specs import JobSpec


@dataclass(frozen=True)
class Cell:
    """What a script holds of its cell (its ``CELL``, as JSON data): the cell's key (its
    matrix columns and axes), its status and reason in the run, and its two jobs as the
    pipeline's grid made them."""

    key: dict
    status: str
    reason: str
    save_job: JobSpec
    load_job: JobSpec

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**data, "save_job": self.save_job.to_dict(), "load_job": self.load_job.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> Cell:
        data = checked_keys(cls, data, every=True)
        jobs = {job: JobSpec.from_dict(data[job]) for job in ("save_job", "load_job")}
        return cls(**{**data, **jobs})
