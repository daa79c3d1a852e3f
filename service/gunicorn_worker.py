"""gunicorn's gthread worker, with four changes: the workers share a burst of connections fairly, a worker
holding more than its share hands connections back, a graceful stop closes idle keep-alive connections at
once, and a worker stopped while it boots leaves at once.

A fair share. Every gthread worker waits on the same listening socket and accepts whatever arrives while
its main thread is free. In a burst, the first worker to wake accepts most of it, and a keep-alive client
(a load balancer, wrk) then keeps those connections on that one worker: measured with 16 connections on 2
workers, splits of 326/8 answers, one CPU idle while the other queued. Here each worker publishes how
many connections it holds in a table shared by the master's workers (anonymous shared memory made in the
master before the fork), and accepts only while it holds no more than the least loaded of its peers that
are accepting: the least-connections rule of a load balancer, decided by the workers themselves. So that a
stuck or busy peer never strands a client, a worker that is above its share still takes a connection that
has waited `PEER_GRACE_SECONDS` in the listen queue. gunicorn's `reuse_port` (one listening socket per
worker) spreads connections by a hash of their addresses: for 16 connections on 2 workers, a 5/11 split or
worse one time in five; it also drops a queued connection when its worker restarts.

Handing back. The accept rule counts only peers that accept: a burst that arrives while a peer is still
starting (the first seconds after a start, or after a recycle) all lands on the workers already up, and
keep-alive clients keep it there. So a worker that holds `REBALANCE_GAP` more connections than its least
loaded accepting peer answers its next request with `Connection: close`; the client (wrk, a load balancer,
`requests`) opens a new connection, which the peer takes. Until the counts are within the gap; a balanced
worker never closes a connection.

A prompt stop. gunicorn 26's gthread worker, on SIGTERM, stops accepting and then waits while any
connection is open, for up to `graceful_timeout`. An idle keep-alive connection (a client, a load balancer
or a test that keeps its connection after an answer) is only closed once its keep-alive timeout is
checked, and that check runs after the wait: so one idle connection held every stop and restart for the
whole `graceful_timeout` (30 s), and a restart on the same port then found the port still taken. Requests
in flight still finish as before; only connections with no request in progress are closed, as nginx does
when it stops.

A stop while booting. From the fork until gunicorn installs the worker's own signal handlers (in
`init_process`, after the `post_fork` hook, where a preloaded worker warms up), the worker runs with the
master's handler, which only queues a signal for the master's loop, a loop the worker never runs: a
SIGTERM in that window was lost, the worker booted and served, and the master waited the whole
`graceful_timeout` before it killed it. `stop_promptly_while_booting`, the first thing `post_fork` does,
makes a stop signal in that window end the worker at once; nothing is in flight yet. A SIGTERM that
reaches a worker before CPython's own after-fork code has run is cleared by that code (it takes the signal
for the parent's); the master marks its stop in shared memory (`mark_stops`), and the worker reads the mark.
"""

from __future__ import annotations

import logging
import mmap
import multiprocessing
import os
import queue
import select
import selectors
import signal
import time

from gunicorn.workers.gthread import ThreadWorker

REBALANCE_GAP = 2  # connections above the least loaded accepting peer at which a worker hands one back
PEER_GRACE_SECONDS = 0.1  # how long a connection may wait for a less loaded peer before any worker takes it
DEFER_POLL_SECONDS = 0.01  # how often a worker above its share looks at the listen queue again
SLOTS = 128  # workers of one master at a time; a worker that finds no free slot accepts as gunicorn does
_FIELDS = 3  # per slot: pid, connections held, open to connections (1) or not (0)

log = logging.getLogger(__name__)


class ConnectionTable:
    """How many connections each worker of one gunicorn master holds, in memory shared across the fork.

    Made in the master (the worker class is built there before each fork); each worker claims a slot when
    it starts and writes its own count; the master frees the slot of a worker it has reaped (`release`).
    One aligned 8-byte store per update: a reader sees an old or a new count, never a torn one.
    """

    def __init__(self, slots: int = SLOTS):
        self.slots = slots
        # MAP_SHARED | MAP_ANONYMOUS: the children see it. The last cell: how many slots were ever claimed, so
        # that a worker deciding on every turn of its loop reads those, not all of them.
        self._memory = mmap.mmap(-1, (slots * _FIELDS + 1) * 8)
        self._cells = memoryview(self._memory).cast("q")
        self._claimed = slots * _FIELDS
        self._claim_lock = multiprocessing.get_context("fork").Lock()

    def claim(self, pid: int) -> int | None:
        """A free slot for this worker (one whose process is gone counts as free), or None if none is."""
        if not self._claim_lock.acquire(timeout=1.0):  # a peer killed while claiming: go without a slot
            return None
        try:
            for slot in range(self.slots):
                holder = self._cells[slot * _FIELDS]
                if holder == 0 or not _alive(holder):
                    base = slot * _FIELDS
                    self._cells[base + 1] = 0
                    self._cells[base + 2] = 0
                    self._cells[base] = pid
                    self._cells[self._claimed] = max(self._cells[self._claimed], slot + 1)
                    return slot
            return None
        finally:
            self._claim_lock.release()

    def publish(self, slot: int, connections: int, accepting: bool) -> None:
        base = slot * _FIELDS
        self._cells[base + 1] = connections
        self._cells[base + 2] = 1 if accepting else 0

    def least_loaded_peer(self, slot: int) -> int | None:
        """The fewest connections any other accepting worker holds; None when no other worker accepts."""
        fewest = None
        cells = self._cells
        for other in range(cells[self._claimed]):
            base = other * _FIELDS
            if other != slot and cells[base] and cells[base + 2]:
                held = cells[base + 1]
                if fewest is None or held < fewest:
                    fewest = held
        return fewest

    def release(self, pid: int) -> None:
        """Free the slot of `pid`: the worker itself as it stops, or the master once it has reaped it."""
        for slot in range(self._cells[self._claimed]):
            base = slot * _FIELDS
            if self._cells[base] == pid:
                self._cells[base + 2] = 0
                self._cells[base + 1] = 0
                self._cells[base] = 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ServingWorker(ThreadWorker):
    table: ConnectionTable | None = None  # one per master, made before the first fork

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # runs in the master, before the fork
        if ServingWorker.table is None:
            ServingWorker.table = ConnectionTable()
        self.slot: int | None = None
        self.waiting_since: float | None = None  # when this worker, above its share, first saw a queued connection

    def run(self) -> None:
        """gunicorn 26.2's gthread loop, with the accept decided by `takes_connections` each turn."""
        self.slot = self.table.claim(os.getpid()) if self.table is not None else None
        if self.slot is None:
            log.warning("no free slot in the connection table: this worker accepts without regard to its peers")
        self.poller.register(self.method_queue.fileno(), selectors.EVENT_READ, self.method_queue.run_callbacks)
        self.set_accept_enabled(True)
        try:
            while self.alive:
                self.notify()
                accepting = self.takes_connections()
                if accepting != self._accepting:
                    self.set_accept_enabled(accepting)
                self.publish()
                # Above its share, the worker looks again soon: the peers' counts change without waking it.
                self.wait_for_and_dispatch_events(timeout=1.0 if accepting else DEFER_POLL_SECONDS)
                if not self.is_parent_alive():
                    break
                self.murder_keepalived()
                self.murder_pending()
        finally:
            self._accepting_flag_off()
        self.finish_connections()

    def takes_connections(self) -> bool:
        """Whether to accept now: under gunicorn's cap, and no more loaded than the least loaded peer, or a
        connection has waited `PEER_GRACE_SECONDS` for the peers."""
        if self.nr_conns >= self.worker_connections:
            return False
        if self.slot is None:
            return True
        fewest = self.table.least_loaded_peer(self.slot)
        if fewest is None or self.nr_conns <= fewest:
            self.waiting_since = None
            return True
        if not self.connection_queued():
            self.waiting_since = None
            return False
        now = time.monotonic()
        if self.waiting_since is None:
            self.waiting_since = now
        return now - self.waiting_since >= PEER_GRACE_SECONDS

    def handle_request(self, req, conn):
        """gunicorn's, but a worker holding REBALANCE_GAP more connections than its least loaded peer answers
        with `Connection: close`: its client reconnects, and the peer takes the new connection. A burst that
        arrived while the peers could not accept (still starting) is so shared once they can."""
        if self.over_share():
            req.must_close = True
        return super().handle_request(req, conn)

    def over_share(self) -> bool:
        if self.slot is None:
            return False
        fewest = self.table.least_loaded_peer(self.slot)
        return fewest is not None and self.nr_conns >= fewest + REBALANCE_GAP

    def connection_queued(self) -> bool:
        try:
            return bool(select.select(self.sockets, [], [], 0)[0])
        except (OSError, ValueError):
            return False

    def accept(self, listener) -> None:
        super().accept(listener)
        self.waiting_since = None
        self.publish()  # before the next turn, so that a peer deciding now sees this connection

    def publish(self) -> None:
        """This worker's count, and whether it is open to connections at all (running and under gunicorn's cap):
        a worker that holds back for its peers still counts as open, or two would each wait for the other."""
        if self.slot is not None:
            self.table.publish(self.slot, self.nr_conns, self.alive and self.nr_conns < self.worker_connections)

    def _accepting_flag_off(self) -> None:
        if self.slot is not None:
            self.table.publish(self.slot, self.nr_conns, False)  # stopping: peers no longer wait for it

    def finish_connections(self) -> None:
        """The end of gunicorn's loop: stop accepting, let connections in flight finish within
        `graceful_timeout`, then close everything (unchanged from gunicorn 26.2)."""
        self.set_accept_enabled(False)
        graceful_timeout = time.monotonic() + self.cfg.graceful_timeout
        while self.nr_conns > 0:
            time_remaining = max(graceful_timeout - time.monotonic(), 0)
            if time_remaining == 0:
                break
            self.wait_for_and_dispatch_events(timeout=time_remaining)
            self.murder_keepalived()
            self.murder_pending()
        if self.slot is not None:
            self.table.release(os.getpid())
        self.tpool.shutdown(wait=False)
        self.poller.close()
        self.method_queue.close()
        for sock in self.sockets:
            sock.close()

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


def release_worker(pid: int) -> None:
    """For gunicorn's `child_exit` hook (in the master): free the slot of a worker that has exited, however it died."""
    if ServingWorker.table is not None:
        ServingWorker.table.release(pid)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
# One byte shared by the master and every worker it forks: 1 once the master is stopping. Made at import,
# in the master (gunicorn imports the worker class before the first fork).
_MASTER_STOPPING = mmap.mmap(-1, 1)


def mark_stops(server) -> None:
    """For gunicorn's `when_ready` hook (the master, before its first fork): a stop signal the master receives is
    also written where its workers can read it. A worker that gets the master's SIGTERM in the first instants
    after its fork, before CPython's after-fork code has run, loses it: that code clears the signals that
    arrived (they were meant for the parent). Such a worker still sees the mark (`stop_promptly_while_booting`).
    A stop the master starts without a signal (a worker that could not boot halts it; an error in its loop) is
    marked too: `server.stop`, the one way to the workers' SIGTERM or SIGQUIT, marks before it sends them."""
    master = os.getpid()

    def stopping(signum, frame):
        if os.getpid() == master:  # a worker still holding this handler was signalled itself, not the master
            _MASTER_STOPPING[0] = 1
        server.signal(signum, frame)

    for signum in STOP_SIGNALS:
        signal.signal(signum, stopping)
    stop_workers = server.stop

    def stop(graceful=True):
        _MASTER_STOPPING[0] = 1
        stop_workers(graceful)

    server.stop = stop


def stop_promptly_while_booting(server) -> None:
    """For gunicorn's `post_fork` hook, first thing in a new worker: until the worker installs its own handlers,
    a stop signal ends it at once, including one that reached the master's inherited handler since the fork,
    and one the master received (`mark_stops`) that this worker lost in its fork."""

    def leave(signum, frame):
        raise SystemExit(0)  # gunicorn's spawn_worker lets it through: the worker exits, the master reaps it

    for signum in STOP_SIGNALS:
        signal.signal(signum, leave)
    while True:  # the worker's copy of the master's signal queue: what arrived between the fork and now
        try:
            queued = server.SIG_QUEUE.get_nowait()
        except (queue.Empty, AttributeError):
            break
        if queued in STOP_SIGNALS:
            raise SystemExit(0)
    if _MASTER_STOPPING[0]:  # read after `leave` is in place: a stop marked after this read still reaches it
        raise SystemExit(0)
