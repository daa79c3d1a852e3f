"""gunicorn's gthread worker, with one change: a graceful stop closes idle keep-alive connections at once.

gunicorn 26's gthread worker, on SIGTERM, stops accepting and then waits while any connection is open,
for up to `graceful_timeout`. An idle keep-alive connection (a client, a load balancer or a test that
keeps its connection after an answer) is only closed once its keep-alive timeout is checked, and that
check runs after the wait: so one idle connection held every stop and restart for the whole
`graceful_timeout` (30 s), and a restart on the same port then found the port still taken. Requests in
flight still finish as before; only connections with no request in progress are closed, as nginx does when it stops.
"""

from __future__ import annotations

from gunicorn.workers.gthread import ThreadWorker


class ServingWorker(ThreadWorker):
    def handle_exit(self, sig, frame):
        super().handle_exit(sig, frame)  # stops the loop; gunicorn wakes it through the method queue
        self.method_queue.defer(self.close_idle_connections)

    def close_idle_connections(self) -> None:
        """Close every connection with no request in progress (on the worker's main thread): keep-alive ones
        waiting for their next request, and new ones whose first request has not arrived (gunicorn parks
        those the same way, and they held the stop just as long)."""
        for idle in (self.keepalived_conns, self.pending_conns):
            while idle:
                conn = idle.popleft()
                try:
                    self.poller.unregister(conn.sock)
                except (OSError, KeyError, ValueError):
                    pass  # already unregistered
                self.nr_conns -= 1
                conn.close()
