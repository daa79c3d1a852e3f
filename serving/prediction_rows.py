"""The prediction log's rows, made by its writer thread off the request path (serving/prediction_log.py): each queued
request's rows as the table orders them, and whether a value was outside its version's training range."""

from __future__ import annotations

from itertools import repeat

import orjson


def out_of_range_of(batch: list) -> list[list | None]:
    """Per queued request, per row: whether a numeric value was outside the training min/max (as float32, as drift
    compares), or None without a baseline or the values. A version's requests are compared together, per feature."""
    import numpy as np

    flags: list[list | None] = [None] * len(batch)
    groups: dict[int, list[int]] = {}
    for position, item in enumerate(batch):
        if item[10] is not None and item[9]:
            groups.setdefault(id(item[10]), []).append(position)
    for positions in groups.values():
        baseline = batch[positions[0]][10]
        sizes = [len(batch[position][0]) for position in positions]
        flagged = np.zeros(sum(sizes), dtype=bool)
        for cells in baseline.features:
            if cells.kind != "number":
                continue
            values: list = []
            for position, size in zip(positions, sizes, strict=True):
                column = batch[position][9].get(cells.name)
                values.extend(column if column is not None and len(column) == size else [None] * size)
            array = np.array(values, dtype=np.float32)  # None: NaN, never out of range
            with np.errstate(invalid="ignore"):
                flagged |= (array < np.float32(cells.low)) | (array > np.float32(cells.high))
        start = 0
        for position, size in zip(positions, sizes, strict=True):
            flags[position] = flagged[start : start + size].tolist()
            start += size
    return flags


def table_rows(item: tuple, inputs: list | None, flags: list | None, time_of, nested: bool = False) -> zip:
    """A queued request's rows as `kernel.prediction_db.WRITTEN` orders them (zipped from columns: a 10,000-row
    request's tuples are made in C, not in a Python loop). `nested`: the probabilities stay objects (the inserter
    writes their JSON text), else each is made JSON text here."""
    ids, request_id, created_at, model, version, route, runtime, labels, probabilities = item[:9]
    texts = label_texts(labels)
    if probabilities and not nested:
        dumps = orjson.dumps
        probabilities = [dumps(row).decode() for row in probabilities]
    return zip(ids, repeat(request_id[:64]), repeat(time_of(created_at)), repeat(model), repeat(version),
               repeat(route), repeat(runtime), texts, probabilities if probabilities else repeat(None),
               inputs if inputs else repeat(None), flags if flags is not None else repeat(None))  # fmt: skip


def shared_values(item: tuple, time_of) -> tuple:
    """What every row of a queued request shares, as `kernel.prediction_db.WRITTEN` orders them after the id."""
    request_id, created_at, model, version, route, runtime = item[1:7]
    return request_id[:64], time_of(created_at), model, version, route, runtime


def label_texts(labels: list) -> list:
    """The predicted labels as the table's text (at most 256 characters)."""
    if set(map(type, labels)) <= {str} and max(map(len, labels), default=0) <= 256:
        return labels  # a model's class names: text already, checked short in C
    return [label if type(label) is str and len(label) <= 256 else str(label)[:256] for label in labels]
