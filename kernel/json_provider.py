"""Flask's JSON through orjson: answers are encoded several times faster than with the json module."""

from __future__ import annotations

from typing import Any

import orjson
from flask.json.provider import DefaultJSONProvider

_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


class OrjsonProvider(DefaultJSONProvider):
    """Encodes with orjson (keys in insertion order, NaN as null); anything orjson cannot encode goes
    through Flask's default, so dates, dataclasses and the like still work."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        try:
            return orjson.dumps(obj, default=self.default, option=_OPTIONS).decode()
        except TypeError:  # e.g. an integer beyond 64 bits: the json module writes any integer
            return super().dumps(obj, **kwargs)

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return orjson.loads(s)

    def response(self, *args: Any, **kwargs: Any):
        return self._app.response_class(self.dumps(self._prepare_response_obj(args, kwargs)), mimetype=self.mimetype)
