"""How the service names versions: a `ModelRef`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelRef:
    """A registered version: the only way the service names a model it loads."""

    name: str
    version: str

    def as_dict(self) -> dict:
        return {"name": self.name, "version": self.version}
