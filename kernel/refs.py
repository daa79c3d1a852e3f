"""How the service names versions: a `ModelRef`, and the `AliasState` one read of the registry gives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kernel.rollout_spec import RolloutSpec


@dataclass(frozen=True)
class ModelRef:
    """A registered version: the only way the service names a model it loads."""

    name: str
    version: str

    def as_dict(self) -> dict:
        return {"name": self.name, "version": self.version}


@dataclass(frozen=True)
class AliasState:
    """One read of the registry: the versions carrying the active alias (one: ok; none: missing; more: conflict).

    The same read carries the running rollout (`rollout`), and a rollout whose aliases were moved by hand
    (`overridden`: its spec is still in MLflow, but the active alias is no longer on its stable version or
    the rollout alias no longer on its candidate). Neither takes part in comparisons."""

    holders: tuple[ModelRef, ...] = ()
    models: int = field(
        default=0, compare=False
    )  # registered models seen by the read: 0 is an empty registry (the default model's cue)
    rollout: RolloutSpec | None = field(default=None, compare=False)
    overridden: tuple[RolloutSpec, ...] = field(default=(), compare=False)

    @property
    def status(self) -> str:
        """`ok`, `missing` or `conflict`."""
        return "ok" if len(self.holders) == 1 else "missing" if not self.holders else "conflict"

    @property
    def active(self) -> ModelRef | None:
        """The version that serves: the one holder, or None when the alias is missing or in conflict."""
        return self.holders[0] if len(self.holders) == 1 else None
