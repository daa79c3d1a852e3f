"""gunicorn's logger, without its access line: the app writes one line per request itself (kernel/logs.py).

With a `logconfig_dict`, gunicorn 26 counts its access log as enabled whatever level its logger has, and
builds every request's Apache-style atoms before the level check drops the line: 4 % of a worker's time
on one-row /predict (py-spy, --gil). Its own lines (start-up, workers, errors) are unchanged.
"""

from __future__ import annotations

from gunicorn.glogging import Logger


class ServingLogger(Logger):
    access_log_enabled = False  # gunicorn checks it before building the line (and so do its HTTP/2 handlers)

    def access(self, resp, req, environ, request_time) -> None:
        return None
