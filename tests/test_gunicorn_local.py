"""gunicorn on the embedded store (as `make run`): both preload settings, and workers recycled after a swap."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import AUTH, DEFAULT_NAME, IRIS_ROW, ref
from tests.servers import Service


def predict(url: str) -> requests.Response:
    return requests.post(f"{url}/predict", json=IRIS_ROW, timeout=30, headers={"Connection": "close"})


@pytest.mark.parametrize("preload", ["false", "true"])
def test_empty_store_bootstraps_once_and_swaps_reach_every_worker(tmp_path, preload):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "GUNICORN_PRELOAD": preload}
    service = Service(env, tmp_path, workers=4).start()
    try:
        models = requests.get(f"{service.url}/models", timeout=30).json()["models"]
        assert [(m["name"], m["version"]) for m in models] == [(DEFAULT_NAME, "1")]
        trained = requests.post(f"{service.url}/train", json={"estimator": "GaussianNB", "dataset": "iris",
                                                               "model_name": "iris-nb", "wait": True}, timeout=300, headers=AUTH)  # fmt: skip
        assert trained.status_code == 201, trained.text
        pids, sent, deadline = set(), 0, time.monotonic() + 20
        # Right after the 201, whichever worker answers serves the new version. A new connection goes to a
        # worker holding the fewest (service/gunicorn_worker.py): one that still holds an idle keep-alive
        # connection (requests leaves the /train one open; gunicorn closes it after its keepalive, 5 s) takes
        # none meanwhile, so keep asking, bounded in requests and time, until every one of the 4 has answered.
        while (len(pids) < 4 or sent < 40) and sent < 20_000 and time.monotonic() < deadline:
            answer = predict(service.url)
            sent += 1
            assert ref(answer.json()["model"]) == {"name": "iris-nb", "version": "1"}
            pids.add(answer.headers["X-Worker-Pid"])
        assert len(pids) == 4, f"{sent} requests reached only {len(pids)} workers"
    finally:
        service.stop()


def fork_servers() -> list[tuple[int, list[str]]]:
    """The fork servers running on this machine (training/fork_server.py): pid and command line."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().decode(errors="replace").rstrip("\0").split("\0")
        except OSError:
            continue
        if "training.fork_server" in command:
            found.append((int(entry.name), command))
    return found


def test_recycled_workers_serve_the_current_version_and_keep_one_warm_parent(tmp_path):
    """With preload, a recycled worker forks from the master's (older) model and must catch up first. The
    jobs' warm parent belongs to the master, not to the worker that started it: recycled workers neither
    end it nor start others."""
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "GUNICORN_MAX_REQUESTS": "10",
           "GUNICORN_MAX_REQUESTS_JITTER": "0", "ACTIVE_POLL_SECONDS": "60", "TRAIN_WARM_START": "true"}  # fmt: skip
    service = Service(env, tmp_path, workers=2).start()
    try:
        # Not a waited /train: a worker recycled by max_requests gives a request in flight only its
        # graceful_timeout, and a job here may take longer under load. The job outlives any worker.
        sent = requests.post(f"{service.url}/train", json={"estimator": "GaussianNB", "dataset": "iris",
                                                           "model_name": "iris-nb"}, timeout=60, headers=AUTH)  # fmt: skip
        assert sent.status_code == 202, sent.text
        job_url = f"{service.url}/train/jobs/{sent.json()['job_id']}"
        deadline = time.monotonic() + 300
        while (job := requests.get(job_url, timeout=30, headers=AUTH).json())["status"] != "succeeded":
            assert job["status"] in ("queued", "running"), (job, service.log_tail())
            assert time.monotonic() < deadline, (job, service.log_tail())
            time.sleep(0.5)
        pids = set()
        for _ in range(80):  # every worker is replaced several times over
            answer = predict(service.url)
            assert answer.status_code == 200
            assert ref(answer.json()["model"]) == {"name": "iris-nb", "version": "1"}
            pids.add(answer.headers["X-Worker-Pid"])
        assert len(pids) > 4, "workers were not recycled"
        master = str(service.process.pid)
        deadline = time.monotonic() + 30  # a second one started in the same instant leaves within 10 s
        while len([pid for pid, command in fork_servers() if command[-1] == master]) != 1:
            assert time.monotonic() < deadline, (fork_servers(), master, service.log_tail())
            time.sleep(0.2)
    finally:
        service.stop()
    deadline = time.monotonic() + 30  # and it ends with the master
    while any(command[-1] == master for _, command in fork_servers()):
        assert time.monotonic() < deadline, "the fork server outlived the service"
        time.sleep(0.2)


def test_a_stop_does_not_wait_for_idle_keep_alive_connections(tmp_path):
    """An idle keep-alive connection (a client or a load balancer that keeps it after an answer) held
    gunicorn 26's graceful stop for the whole graceful_timeout (30 s), and a restart on the same port
    then failed: the stop closes such connections at once, and one in flight still gets its answer."""
    import http.client
    import socket
    import time

    service = Service({"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}, tmp_path, workers=2).start()
    rows = 5_000
    body = json.dumps({"records": [IRIS_ROW] * rows}).encode()
    head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{service.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    busy = socket.create_connection(("127.0.0.1", service.port), timeout=60)
    idle = []
    try:
        # In flight: all of the request but its last byte is sent, and a worker has read all of that (the
        # app is reading the body), so the request is past gunicorn's queue when the stop begins.
        busy.sendall(head + body[:-1])
        wait_until_read(service.port, busy.getsockname()[1])
        for _ in range(4):  # several, so that both workers hold one
            connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
            connection.request("GET", "/health")
            assert connection.getresponse().read()
            idle.append(connection)
        started = time.monotonic()
        service.process.terminate()
        # The stop has begun: the master took the signal, and the workers closed every idle connection.
        deadline = time.monotonic() + 30
        while "Handling signal: term" not in service.log_text():
            assert time.monotonic() < deadline, service.log_tail()
            time.sleep(0.05)
        for connection in idle:
            connection.sock.settimeout(max(deadline - time.monotonic(), 0.1))
            assert connection.sock.recv(1) == b"", "an idle connection was not closed by the stop"
        busy.sendall(body[-1:])
        answer = http.client.HTTPResponse(busy)
        answer.begin()
        assert answer.status == 200, answer.read()
        assert len(json.loads(answer.read())["predictions"]) == rows
        service.process.wait(timeout=60)
        took = time.monotonic() - started
    finally:
        for connection in idle:
            connection.close()
        busy.close()
        service.stop()
    assert took < 10, f"the graceful stop took {took:.1f} s"
    service.start()  # the same port is free again
    service.stop()


def wait_until_read(server_port: int, client_port: int, timeout: float = 30) -> None:
    """Wait until the server's end of this loopback connection has nothing left unread (/proc/net/tcp)."""
    import time

    local, remote = f"0100007F:{server_port:04X}", f"0100007F:{client_port:04X}"
    deadline = time.monotonic() + timeout
    while True:
        with open("/proc/net/tcp") as table:
            queues = [line.split()[4] for line in table if line.split()[1:3] == [local, remote]]
        assert queues, "the server has not accepted the connection"
        if int(queues[0].split(":")[1], 16) == 0:
            return
        assert time.monotonic() < deadline, f"the server left {int(queues[0].split(':')[1], 16)} bytes unread"
        time.sleep(0.05)


def test_a_stop_the_master_marks_ends_a_booting_worker_that_lost_the_signal_and_a_worker_never_marks_it():
    """CPython clears, in a new child, the signals that arrived before its after-fork code ran: a worker sent the
    master's SIGTERM in that instant lost it, booted and held the stop for graceful_timeout (CI, the warm-up
    drill). The master's mark is what such a worker reads; a worker signalled on its own (TTOU's SIGTERM) must
    not mark it, or every worker booted after would leave."""
    import os
    import queue
    import signal

    from service import gunicorn_worker

    class Master:
        SIG_QUEUE = queue.SimpleQueue()
        stopped: list = []

        def signal(self, signum, frame):
            self.SIG_QUEUE.put_nowait(signum)

        def stop(self, graceful=True):
            self.stopped.append(graceful)

    saved = {signum: signal.getsignal(signum) for signum in gunicorn_worker.STOP_SIGNALS}
    master = Master()
    try:
        gunicorn_worker.mark_stops(master)
        child = os.fork()
        if child == 0:  # a worker before its own handlers: the master's handler, signalled itself
            os.kill(os.getpid(), signal.SIGTERM)
            os._exit(0 if master.SIG_QUEUE.get(timeout=5) == signal.SIGTERM else 1)
        assert os.waitpid(child, 0)[1] == 0
        assert gunicorn_worker._MASTER_STOPPING[0] == 0, "a worker's own SIGTERM marked the master's stop"
        gunicorn_worker.stop_promptly_while_booting(master)  # no stop: the worker goes on booting
        gunicorn_worker.mark_stops(master)  # back to the master's handlers (the call above put the worker's)
        os.kill(os.getpid(), signal.SIGTERM)  # now the master is told to stop
        assert master.SIG_QUEUE.get(timeout=5) == signal.SIGTERM and gunicorn_worker._MASTER_STOPPING[0] == 1
        with pytest.raises(SystemExit):  # a worker whose queue is empty (the signal was lost) still leaves
            gunicorn_worker.stop_promptly_while_booting(master)
        gunicorn_worker._MASTER_STOPPING[0] = 0
        master = Master()  # a stop with no signal (a worker that could not boot halts the master): marked too
        gunicorn_worker.mark_stops(master)
        master.stop(False)
        assert master.stopped == [False] and gunicorn_worker._MASTER_STOPPING[0] == 1
    finally:
        gunicorn_worker._MASTER_STOPPING[0] = 0
        for signum, handler in saved.items():
            signal.signal(signum, handler)
