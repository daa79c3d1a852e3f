"""This machine's pointer file (`<state dir>/active.json`): the version the workers of one machine serve."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from kernel.registry import ModelRef

StatKey = tuple[int, int, int]


class Pointer:
    """Reads and atomically replaces the pointer file; its stat key tells a worker that it changed."""

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / "active.json"

    def stat_key(self) -> StatKey | None:
        """(inode, mtime, size) of the file, or None where there is none: a stat, no read, no MLflow call."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (stat.st_ino, stat.st_mtime_ns, stat.st_size)

    def read(self) -> ModelRef | None:
        """The version the file names; None where there is no file or it does not parse."""
        try:
            data = json.loads(self.path.read_text())
            return ModelRef(data["name"], str(data["version"]))
        except (FileNotFoundError, ValueError, KeyError):
            return None

    def write(self, ref: ModelRef) -> None:
        """Atomically replace the pointer (a new inode, so every worker's stat sees the change)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(prefix=".active-", dir=self.state_dir)
        with os.fdopen(handle, "w") as file:
            json.dump(ref.as_dict(), file)
        os.replace(staging, self.path)
