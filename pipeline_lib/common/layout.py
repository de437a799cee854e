"""A layout (docs: glossary): a framework on a device mesh, as the grid makes it from the config
and as job specs and records hold it. Pure (no torch), in the lowest wing: plan, job, verify and
results all name layouts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from pipeline_lib.common.json_form import FormError, checked_keys

# The framework of an existing checkpoint's side: the layout that wrote it is not known.
EXISTING = "existing"


@dataclass(frozen=True)
class Layout:
    name: str
    framework: str
    mesh: tuple[int, ...]
    mesh_dims: tuple[str, ...]
    tp_dim: str | None
    # Pipeline-parallel frameworks only (None for others): the schedule and its microbatches.
    schedule: str | None = None
    microbatches: int | None = None

    @classmethod
    def existing(cls, name: str) -> Layout:
        """An existing checkpoint in the save layout's place: its name, no mesh (the layout
        that wrote it is not known)."""
        return cls(name, EXISTING, (), (), None)

    @property
    def world_size(self) -> int | None:
        """The ranks of the mesh; None for an existing checkpoint's (no mesh)."""
        return math.prod(self.mesh) if self.mesh else None

    @property
    def tp_degree(self) -> int:
        return dict(zip(self.mesh_dims, self.mesh, strict=True))[self.tp_dim] if self.tp_dim else 1

    def to_dict(self) -> dict:
        """The layout as job specs and records hold it (JSON's lists for the tuples)."""
        data = {**asdict(self), "world_size": self.world_size}
        return {**data, "mesh": list(self.mesh), "mesh_dims": list(self.mesh_dims)}

    @classmethod
    def from_dict(cls, data: dict) -> Layout:
        """The inverse of ``to_dict``: an unknown or missing key, or a world_size that is not
        the mesh's, is an error naming it."""
        data = checked_keys(cls, data, extra=frozenset({"world_size"}))
        if "world_size" not in data:
            raise FormError("Layout: missing key(s) world_size")
        stated = data.pop("world_size")
        layout = cls(**{**data, "mesh": tuple(data["mesh"]), "mesh_dims": tuple(data["mesh_dims"])})
        if stated != layout.world_size:
            raise FormError(f"Layout {layout.name}: world_size {stated} is not its mesh's")
        return layout
