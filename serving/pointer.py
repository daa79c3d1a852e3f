"""This machine's cache of the active alias: the pointer file (`<state dir>/active.json`) and its generation.

The pointer file says which version the workers of one machine serve, what the last read of the
alias found (`ok`, `missing`, `conflict` with the holders) and the running rollout's spec, if any. It is a cache of the MLflow alias, never the
truth: the poller rewrites it from the alias. The generation (8 bytes in shared memory, mapped into every
worker's memory) is bumped after each rewrite, so a request sees a change with one memory read instead
of a `stat` of the file.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kernel.registry import AliasState, ModelRef
from kernel.rollout_spec import RolloutSpec

_COUNTER = struct.Struct("<Q")
SHARED_MEMORY = Path("/dev/shm")


def generation_path(state_dir: Path) -> Path:
    """Where a state folder's generation lives: in shared memory (/dev/shm), named after the folder, so
    that nothing in the state folder stays open for writing (it can be remounted read-only); in the
    folder itself where there is no /dev/shm (AWS Lambda, macOS)."""
    if SHARED_MEMORY.is_dir() and os.access(SHARED_MEMORY, os.W_OK):
        digest = hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:20]
        return SHARED_MEMORY / f"model-serving-{digest}.generation"
    return Path(state_dir) / "generation"


@dataclass(frozen=True)
class PointerState:
    """The version this machine serves and the alias as last read (a conflict keeps the version it had)."""

    ref: ModelRef | None
    alias: AliasState
    rollout: RolloutSpec | None = None  # the running rollout, as the last poll read it

    def as_dict(self) -> dict:
        return {
            **(self.ref.as_dict() if self.ref else {}),
            "alias_status": self.alias.status,
            "holders": [holder.as_dict() for holder in self.alias.holders],
            **({"rollout": self.rollout.as_dict()} if self.rollout else {}),
        }


class Pointer:
    """Reads and atomically replaces the pointer file."""

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / "active.json"

    def stat_key(self) -> tuple[int, int, int] | None:
        """(inode, mtime, size) of the file, or None: the generation's stand-in where it cannot be mapped."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (stat.st_ino, stat.st_mtime_ns, stat.st_size)

    def read_state(self) -> PointerState:
        """What the file says; no version where there is no file or it does not parse.

        A file written before the alias status was kept (a name and a version only) reads as `ok`.
        """
        try:
            data = json.loads(self.path.read_text())
            ref = ModelRef(data["name"], str(data["version"])) if "name" in data else None
            holders = tuple(ModelRef(h["name"], str(h["version"])) for h in data.get("holders", [data] if ref else []))
            rollout = RolloutSpec.from_json(json.dumps(data["rollout"])) if "rollout" in data else None
            return PointerState(ref, AliasState(holders), rollout)
        except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):
            return PointerState(None, AliasState())

    def read(self) -> ModelRef | None:
        """The version the file names, or None."""
        return self.read_state().ref

    def write(self, state: PointerState | ModelRef) -> None:
        """Atomically replace the pointer (a new inode: a worker without the generation sees it by stat)."""
        if isinstance(state, ModelRef):
            state = PointerState(state, AliasState((state,)))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(prefix=".active-", dir=self.state_dir)
        with os.fdopen(handle, "w") as file:
            json.dump(state.as_dict(), file)
        os.replace(staging, self.path)


class Generation:
    """A counter shared by the processes of one machine through a mapped file: read without a system call.

    Bumped (under the machine's activate lock) after every rewrite of the pointer. Where the file cannot
    be created or mapped, `value()` falls back to the pointer's stat.
    """

    def __init__(self, state_dir: Path, pointer: Pointer):
        self.path = generation_path(state_dir)
        self.pointer = pointer
        self._map: mmap.mmap | None = None
        self._open()

    def _open(self) -> None:
        """Map the counter for reading and writing; on failure leave it unmapped (the stat stands in)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return
        try:
            if os.fstat(descriptor).st_size < _COUNTER.size:
                os.ftruncate(descriptor, _COUNTER.size)
            self._map = mmap.mmap(descriptor, _COUNTER.size)
        except (OSError, ValueError):
            self._map = None
        finally:
            os.close(descriptor)  # the mapping keeps the file

    def value(self) -> object:
        """The current generation (compare with `!=` only); a memory read, no system call."""
        counter = self._map
        if counter is None:
            return self.pointer.stat_key()
        return _COUNTER.unpack_from(counter)[0]

    def bump(self) -> None:
        """Tell every process of the machine that the pointer changed (call under the activate lock)."""
        if self._map is None:
            self._open()
        if self._map is not None:
            _COUNTER.pack_into(self._map, 0, _COUNTER.unpack_from(self._map)[0] + 1)
