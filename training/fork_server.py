"""The warm parent of local jobs: a process that has imported the training code once, and forks each job's process.

A job's process started with `python -m training.job_process` spends seconds importing MLflow,
scikit-learn and the training code before it can take its job. The fork server does that once: the
local executor sends it the job's id and settings over a Unix socket, and it forks the job's process,
which runs the same `job_process.main` at once (its lock, its slot, its attempts in a billiard pool
with the time limits). The job's process is in a session of its own and named for its job (ps shows
`training job <id>`), killable alone, and outlives the fork server as it outlives the service.

One fork server per code and environment: its socket's name carries a fingerprint of both (the Python,
the project's files, the environment), in a folder only this user can open. A service started with other
code or settings than a running fork server's gets a fork server of its own. The fork server ends when the
process that owns it ends (the gunicorn master, or the process that started it); the next job's `send` then
starts one again, and runs cold meanwhile. `TRAIN_WARM_START=false` does without it: every job starts cold.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from kernel.config import PROJECT_ROOT
from kernel.locks import try_lock

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 5.0
OWNER_POLL_SECONDS = 1.0
LOCK_WAIT_SECONDS = 10.0


def runtime_folder() -> Path:
    """This user's private folder for fork servers' sockets (a socket's path must stay under 108 bytes)."""
    folder = Path(tempfile.gettempdir()) / f"model-serving-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.stat().st_uid != os.getuid() or folder.stat().st_mode & 0o077:
        raise OSError(f"{folder} is not this user's private folder")
    return folder


def fingerprint(env: dict[str, str]) -> str:
    """What a fork server's jobs depend on beyond their settings: the Python, the project's code, the environment."""
    digest = hashlib.sha256(f"{sys.executable}\0{PROJECT_ROOT}".encode())
    for package in ("kernel", "training"):
        for path in sorted((PROJECT_ROOT / package).glob("*.py")):
            stat = path.stat()
            digest.update(f"{path}\0{stat.st_mtime_ns}\0{stat.st_size}\0".encode())
    for key, value in sorted(env.items()):
        digest.update(f"{key}={value}\0".encode())
    return digest.hexdigest()[:20]


class ForkServerClient:
    """The service's side: asks the fork server for a job's process, and starts a fork server when none answers."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.key = fingerprint(env)
        self.owner = os.getpid()  # the fork server ends with this process (a gunicorn worker sets its master)
        self._launched_at = 0.0

    @property
    def socket_path(self) -> Path:
        return runtime_folder() / f"train-{self.key}.sock"

    def fork_job(self, job_id: str, settings_json: str, log_path: Path) -> int | None:
        """The pid of the job's process, forked warm; None when no fork server answered (one is started)."""
        request = json.dumps({"job_id": job_id, "settings": settings_json, "log": str(log_path)}) + "\n"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
                connection.settimeout(CONNECT_TIMEOUT_SECONDS)
                connection.connect(str(self.socket_path))
                connection.sendall(request.encode())
                answer = json.loads(connection.makefile().readline() or "{}")
        except (OSError, ValueError):
            answer = {}
        if "pid" in answer:
            return int(answer["pid"])
        self.start_server()
        return None

    def is_up(self) -> bool:
        """A fork server answers on this code's socket."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
                connection.settimeout(CONNECT_TIMEOUT_SECONDS)
                connection.connect(str(self.socket_path))
                return True
        except OSError:
            return False

    def start_server(self) -> None:
        """Start a fork server in a session of its own, unless one holds this code's lock (it is up or on its way
        up, started by any process) or this process started one within the last minute."""
        if time.monotonic() - self._launched_at < 60 and self._launched_at:
            return
        held = try_lock(self.socket_path.with_suffix(".lock"))
        if held is None:
            return
        held.close()
        self._launched_at = time.monotonic()
        folder = runtime_folder()
        with open(folder / f"train-{self.key}.log", "a") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "training.fork_server", str(self.socket_path), str(self.owner)],
                cwd=PROJECT_ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        threading.Thread(target=process.wait, name="fork-server-reaper", daemon=True).start()


# ---- the fork server's side --------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _take_lock(path: Path):
    """The fork server's own lock (one per socket), waited for while an ending one still holds it."""
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while (handle := try_lock(path)) is None:
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)
    return handle


def _job_process(request: dict, inherited: list) -> None:
    """In the forked child: become the job's own process (session, name, log), then run the job; never returns."""
    from training.job_process import drop_inherited_connections, main

    status = 1
    try:
        for handle in inherited:  # the fork server's socket and lock are not the job's
            handle.close()
        drop_inherited_connections()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the job's pool waits for its own processes
        os.setsid()
        log_file = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for stream in (1, 2):
            os.dup2(log_file, stream)
        os.close(log_file)
        logging.root.handlers.clear()  # the fork server's own; the job configures its logging itself
        import setproctitle

        setproctitle.setproctitle(f"training job {request['job_id']} (forked by training.fork_server)")
        from kernel.config import settings_from_json

        main(request["job_id"], settings_from_json(request["settings"]))
        status = 0
    except BaseException:
        logging.getLogger(__name__).exception("job %s: its process failed", request.get("job_id"))
    finally:
        logging.shutdown()
        os._exit(status)


_warmed: set[str] = set()


def _warm_registry(settings_json: str) -> None:
    """MLflow's stores for the job's tracking URI, built once here (a database's schema check costs about a
    second per process): the jobs' processes inherit them and open their own connections."""
    from kernel.config import settings_from_json
    from kernel.registry import registry_from_settings

    settings = settings_from_json(settings_json)
    if settings.MLFLOW_TRACKING_URI not in _warmed:
        registry_from_settings(settings)
        _warmed.add(settings.MLFLOW_TRACKING_URI)


def _answer(connection: socket.socket, inherited: list) -> None:
    """Read one request and fork the job's process; the answer is its pid."""
    connection.settimeout(CONNECT_TIMEOUT_SECONDS)
    request = json.loads(connection.makefile().readline())
    try:
        _warm_registry(request["settings"])
    except Exception as exc:  # the job's own process meets the same error, and records it
        log.warning("job %s: could not open its registry ahead: %s", request["job_id"], exc)
    pid = os.fork()
    if pid == 0:
        _job_process(request, [connection, *inherited])
    connection.sendall((json.dumps({"pid": pid}) + "\n").encode())
    log.info("job %s: forked its process %d", request["job_id"], pid)


def serve(socket_path: Path, owner: int) -> None:
    """Import the training code, then fork a job's process per request, until its owner process ends."""
    from training.attempt import preload_training

    lock = _take_lock(socket_path.with_suffix(".lock"))
    if lock is None:
        return  # another fork server answers on this socket
    preload_training()
    import setproctitle  # noqa: F401 - a job names its process without importing anything

    socket_path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    listener.listen(64)
    listener.settimeout(OWNER_POLL_SECONDS)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the jobs' processes
    log.info("fork server %d ready on %s", os.getpid(), socket_path)
    try:
        while _alive(owner):
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection:
                try:
                    _answer(connection, [listener, lock])
                except (OSError, ValueError, KeyError) as exc:
                    log.warning("a request to the fork server failed: %s", exc)
    finally:
        socket_path.unlink(missing_ok=True)
        listener.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fork-server %(levelname)s %(message)s")
    serve(Path(sys.argv[1]), int(sys.argv[2]))
