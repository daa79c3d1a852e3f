"""Drift counts: each served row's cells against its version's baseline, in time slots, merged across workers.

Each process keeps, per served version, an int64 array of SLOTS time slots, each holding the slot's number
(time // slot length), its rows, and one count per cell of the baseline (`kernel.drift_format`). With
PROMETHEUS_MULTIPROC_DIR (gunicorn) the array is a memory-mapped file, `drift_<key>_<pid>.counts` (the key
names the baseline and the version: two versions sharing a baseline still count apart),
so a write is a memory write under a lock, with no system call, and a reader (any worker) sums every
process's file, dead workers' included (their counts were real), as Prometheus does for counters. The
suffix is not `.db`, so Prometheus's collector skips these files; gunicorn's `on_starting` clears them with
the rest. Without the folder (Lambda, one process) the arrays stay in memory.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from array import array
from bisect import bisect_right
from operator import itemgetter
from pathlib import Path

import numpy as np

from kernel.drift_format import Baseline, FeatureCells, number_bins, text_key

SLOTS = 60
_HEADER = 2  # per slot: its number, its rows


def _sampled(n_rows: int, max_rows: int):
    """A picker of evenly spaced rows (a sequence -> a tuple of them) when a batch has more rows than are
    counted; None: every row."""
    if n_rows <= max_rows:
        return None
    getter = itemgetter(*np.linspace(0, n_rows - 1, max_rows).round().astype(np.int64).tolist())
    return getter if max_rows > 1 else lambda sequence: (getter(sequence),)  # one index: itemgetter gives no tuple


def _number_cells(cells: FeatureCells, values: list, picked) -> list[np.ndarray]:
    if picked is not None:
        values = picked(values)
    array = np.array(values, dtype=np.float32)  # None: NaN
    bins = number_bins(array, cells.edges)
    found = [cells.offset + np.where(bins < 0, cells.size - 1, bins)]
    with np.errstate(invalid="ignore"):
        below, above = array < np.float32(cells.low), array > np.float32(cells.high)
    if below.any():
        found.append(np.full(int(below.sum()), cells.offset + cells.size))
    if above.any():
        found.append(np.full(int(above.sum()), cells.offset + cells.size + 1))
    return found


def _keyed_cells(cells: FeatureCells, values: list, picked) -> np.ndarray:
    if picked is not None:
        values = picked(values)
    other, missing = cells.size - 2, cells.size - 1  # booleans have no `other`: an unknown key cannot occur
    lookup = cells.values
    # Each distinct value is keyed once (a batch repeats few values); then every row's cell by one C-level lookup.
    # The type is part of the value, so 1 and True stay apart as text_key keeps them.
    typed = list(zip(map(type, values), values))
    cell = {}
    for pair in set(typed):
        key = text_key(pair[1])
        cell[pair] = missing if key is None else lookup.get(key, other)
    return cells.offset + np.fromiter(map(cell.__getitem__, typed), dtype=np.int64, count=len(values))


def small_cells(baseline: Baseline, columns: dict, labels: list) -> list[int]:
    """row_cells for a few rows, in plain Python: bisect on the float32 edges, no numpy call setup.

    `array("f", ...)` rounds each value to float32 as the numpy path does, so both put a value in one cell.
    """
    found = []
    for cells in baseline.features:
        values, offset = columns[cells.name], cells.offset
        if cells.kind != "number":
            other, missing, lookup = offset + cells.size - 2, offset + cells.size - 1, cells.values
            found += [missing if (key := text_key(v)) is None else offset + lookup.get(key, other - offset)
                      for v in values]  # fmt: skip
            continue
        if None in values:
            found += [offset + cells.size - 1] * values.count(None)
            values = [v for v in values if v is not None]
        edges, low, high = cells.edge_list, cells.low32, cells.high32
        for value in array("f", values):
            found.append(offset + bisect_right(edges, value))
            if value < low:
                found.append(offset + cells.size)
            elif value > high:
                found.append(offset + cells.size + 1)
    classes = baseline.class_cells
    found += [classes[key] for key in map(str, labels) if key in classes]
    return found


def row_cells(baseline: Baseline, columns: dict, labels: list, max_rows: int) -> tuple[np.ndarray, int]:
    """Every cell the rows fall in (one per feature and row, one per class predicted, the flags), and the rows."""
    n_rows = len(labels)
    picked = _sampled(n_rows, max_rows)
    found: list[np.ndarray] = []
    for cells in baseline.features:
        values = columns[cells.name]
        if cells.kind == "number":
            found.extend(_number_cells(cells, values, picked))
        else:
            found.append(_keyed_cells(cells, values, picked))
    classes = baseline.class_cells
    chosen = labels if picked is None else picked(labels)
    predicted = [classes.get(str(label)) for label in chosen]
    found.append(np.fromiter((c for c in predicted if c is not None), dtype=np.int64))
    return np.concatenate(found), n_rows if picked is None else len(chosen)


class VersionCounts:
    """This process's slots for one version's baseline (a file under `folder`, or memory)."""

    def __init__(self, baseline: Baseline, slot_seconds: float, folder: str | None, key: str | None = None):
        self.baseline = baseline
        self.key = key or baseline.sha256[:12]
        self.slot_seconds = slot_seconds
        self.lock = threading.Lock()
        shape = (SLOTS, _HEADER + baseline.cells)
        self.path = None  # this process's file: a reader never deletes it, however long it has been idle
        if folder:
            path = self.path = Path(folder) / f"drift_{self.key}_{os.getpid()}.counts"
            self.slots = np.memmap(path, dtype=np.int64, mode="r+" if path.exists() else "w+", shape=shape)
        else:
            self.slots = np.zeros(shape, dtype=np.int64)
        self.width = shape[1]
        self.flat = memoryview(self.slots).cast("B").cast("q")  # item access without numpy's scalar boxing

    def add(self, cells, rows: int, now: float | None = None) -> None:
        """Count rows falling in `cells` (a list of a few, added one by one, or an array, added by bincount)."""
        number = int((time.time() if now is None else now) // self.slot_seconds)
        base = (number % SLOTS) * self.width
        flat = self.flat
        with self.lock:
            if flat[base] != number:  # a slot from a window ago: reused
                self.slots[number % SLOTS] = 0
                flat[base] = number
            flat[base + 1] += rows
            if isinstance(cells, list):
                start = base + _HEADER
                for cell in cells:
                    flat[start + cell] += 1
            else:
                self.slots[number % SLOTS, _HEADER:] += np.bincount(cells, minlength=self.baseline.cells)


def counts_key(baseline: Baseline, name: str, version: str) -> str:
    """The count files' key for one version and its baseline."""
    tag = hashlib.blake2b(f"{name}\0{version}".encode(), digest_size=4).hexdigest()
    return f"{baseline.sha256[:12]}-{tag}"


def merged(baseline: Baseline, window_seconds: float, slot_seconds: float, folder: str | None, local=None,
           now: float | None = None, key: str | None = None) -> tuple[int, np.ndarray]:  # fmt: skip
    """The rows and cell counts of the last `window_seconds`, summed over every process's slots for the key
    (by default the baseline's own: `counts_key` for one version's).

    `local` is this process's own VersionCounts (read from memory when there is no folder). Files whose newest
    slot is older than the whole ring are deleted.
    """
    current = int((time.time() if now is None else now) // slot_seconds)
    oldest = current - max(1, int(np.ceil(window_seconds / slot_seconds))) + 1
    sources = []
    if folder:
        for path in Path(folder).glob(f"drift_{key or baseline.sha256[:12]}_*.counts"):
            try:
                slots = np.fromfile(path, dtype=np.int64).reshape(SLOTS, _HEADER + baseline.cells)
            except (OSError, ValueError):
                continue  # a file being created, or of another layout
            if slots[:, 0].max() < current - SLOTS and path != getattr(local, "path", None):  # idle a whole ring
                path.unlink(missing_ok=True)
                continue
            sources.append(slots)
    elif local is not None:
        sources.append(np.array(local.slots))
    rows, counts = 0, np.zeros(baseline.cells, dtype=np.int64)
    for slots in sources:
        recent = (slots[:, 0] >= oldest) & (slots[:, 0] <= current)
        rows += int(slots[recent, 1].sum())
        counts += slots[recent, _HEADER:].sum(axis=0)
    return rows, counts
