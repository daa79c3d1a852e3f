"""`make bench`'s processes: each in its own process group, stopped together; what /proc says of them; HTTP.

Part of scripts/bench_serving.py (`make bench`), shared with the scripts that reuse its parts (bench_start.py,
bench_settings.py, bench_active_check.py).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


# ---- processes ---------------------------------------------------------------------------------------------
class Processes:
    """Every process the benchmark starts, each in its own process group, stopped together at the end."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def start(self, command: list[str], **kwargs) -> subprocess.Popen:
        process = subprocess.Popen(command, start_new_session=True, **kwargs)
        self.started.append(process)
        return process

    def stop(self, process: subprocess.Popen, timeout: float = 20.0) -> None:
        """SIGTERM to the process group, SIGKILL to what is left after `timeout`."""
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        # The group may outlive its leader (uvicorn's and gunicorn's workers): nothing of it survives.
        _signal_group(process.pid, signal.SIGKILL)
        if process.poll() is None:
            process.wait()

    def stop_all(self) -> None:
        for process in reversed(self.started):
            self.stop(process)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def children(pid: int) -> list[int]:
    """The direct children of a process (none once it has exited)."""
    found = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found.extend(int(child) for child in (task / "children").read_text().split())
    except (FileNotFoundError, ProcessLookupError):
        return []
    return found


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, children first."""
    found = children(pid)
    return found + [grandchild for child in found for grandchild in descendants(child)]


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return ""


def cpu_seconds(leader: int) -> float:
    """CPU time (user + system) used so far by a process and everything below it, exited children included.

    Unlike req/s, CPU time per request does not depend on what else the shared machine is running.
    """
    total = 0.0
    for pid in [leader, *descendants(leader)]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # utime, stime, and cutime, cstime: the waited-for children that are no longer in the tree.
        total += sum(int(value) for value in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


def memory_mb(pid: int) -> dict:
    """Resident and proportional set size of one process, in MB (10^6 bytes, as the target says)."""
    values = {}
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            parts = line.split()
            if parts[0] in ("Rss:", "Pss:"):
                values[parts[0][:-1].lower()] = round(int(parts[1]) * 1024 / 1e6, 1)
    return values


def total_pss_mb(leader: int) -> float:
    """Proportional set size of a server's whole process tree, in MB: what it costs the machine."""
    total = 0.0
    for pid in [leader, *descendants(leader)]:
        try:
            total += memory_mb(pid).get("pss", 0.0)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return round(total, 1)


# ---- HTTP --------------------------------------------------------------------------------------------------
def post(port: int, path: str, body: bytes, timeout: float = 30.0) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def first_answer(process: subprocess.Popen, started: float, port: int, path: str, body: bytes, timeout: float):
    """Seconds from `started` (just before the process was started) to the first 200, and that answer."""
    deadline = started + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} before answering")
        try:
            status, answer = post(port, path, body, timeout=5)
            if status == 200:
                return time.monotonic() - started, json.loads(answer)
        except OSError:
            pass
        time.sleep(0.02)
    raise TimeoutError(f"no 200 from {path} within {timeout:.0f} s")


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"
