"""How the service names versions: a `ModelRef`, and the `AliasState` one read of the registry gives."""

from __future__ import annotations

from dataclasses import dataclass, field


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

    The same read will carry a rollout's spec (issue 16, section 3)."""

    holders: tuple[ModelRef, ...] = ()
    models: int = field(
        default=0, compare=False
    )  # registered models seen by the read: 0 is an empty registry (the default model's cue)

    @property
    def status(self) -> str:
        """`ok`, `missing` or `conflict`."""
        return "ok" if len(self.holders) == 1 else "missing" if not self.holders else "conflict"

    @property
    def active(self) -> ModelRef | None:
        """The version that serves: the one holder, or None when the alias is missing or in conflict."""
        return self.holders[0] if len(self.holders) == 1 else None
