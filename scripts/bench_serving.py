"""This service against `mlflow models serve` and MLServer on the same registered versions, in one run (`make bench`).

Run: make bench   (or .venv/bin/python scripts/bench_serving.py [--seconds 10]; BENCH_SECONDS=3 shortens it)

On a temporary MLflow store (SQLite and an artifacts folder in a temp dir) it registers LogisticRegression
and RandomForestClassifier(n_estimators=100) on iris with the project's own training code. For each model
it starts this service (gunicorn with gunicorn.conf.py, 2 workers, serving that version) and then
`mlflow models serve -w 2 --env-manager local` on the same version, one after the other, and for each:
- times process start to the first 200 prediction;
- drives it with wrk (same connections, threads and duration for both, one-row JSON bodies): a "cold" run
  that starts the moment the first prediction answers, a warm-up, then the measured warm run; for this
  service also a "recycle" run during which one worker is stopped gracefully (what gunicorn's max_requests
  does) and the master forks a fresh one;
- reads each worker's resident memory after the load;
- for this service, times a 10,000-row POST /predict (median of --repeat) next to scikit-learn's own
  `json.loads` + `pandas.DataFrame` + `predict_proba` on the same body, in this process, on the same model.
MLServer (SeldonIO's inference server, scikit-learn runtime, V2 protocol) is the second peer: installed on
demand into its own venv (build/bench/mlserver-venv: MLServer 1.7.1, uvloop below 0.22, which 1.7.1 needs,
and this venv's scikit-learn, numpy, pandas and scipy), serving the same registered version exported as
its runtime expects (joblib), with `parallel_workers` 2. It is timed and loaded like the others, twice per
model: asking for the same output as ours (labels and probabilities: outputs `predict` and `predict_proba`)
and with its default (labels only). Requests carry one input per column and `content_type: "pd"` (the
pipelines select columns by name). --no-mlserver leaves it out.
The floor: a bare Flask handler (scripts/bench_bare_flask.py) under the same gunicorn settings; one-row
/predict is reported as a share of its throughput.
It prints markdown tables, writes them with every raw figure to build/bench/ (results.md, results.json),
and stops every process it started, also on failure or Ctrl-C. A wrk run with socket errors or non-2xx
answers is flagged in the table and makes the command exit with status 2.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LUA = Path(__file__).resolve().parent / "bench_post.lua"
OUT = ROOT / "build" / "bench"
MODELS = (("LogisticRegression", {}), ("RandomForestClassifier", {"n_estimators": 100}))
IRIS_ROW = {"sepal_length_cm": 5.1, "sepal_width_cm": 3.5, "petal_length_cm": 1.4, "petal_width_cm": 0.2}
TOKEN = "bench-token"
WORKERS = 2
MLSERVER_VERSION = "1.7.1"
MLSERVER_VENV = ROOT / "build" / "bench" / "mlserver-venv"

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


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through the try/finally that stops the processes


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


# ---- wrk ---------------------------------------------------------------------------------------------------
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def parse_wrk(text: str) -> dict:
    """req/s, latency percentiles (ms) and error counts from wrk's --latency report."""
    result = {"requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))}
    result["requests"] = int(re.search(r"(\d+) requests in", text).group(1))
    for percent, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.MULTILINE):
        result[f"p{percent}_ms"] = round(float(value) * _UNITS[unit], 3)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    counts = [int(n) for n in socket_errors.groups()] if socket_errors else [0, 0, 0, 0]
    result["errors"] = dict(zip(("connect", "read", "write", "timeout"), counts, strict=True))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    result["errors"]["non_2xx"] = int(non_2xx.group(1)) if non_2xx else 0
    return result


def wrk_command(args, port: int, path: str, seconds: float) -> list[str]:
    return [
        args.wrk, f"-t{args.threads}", f"-c{args.connections}", f"-d{max(1, round(seconds))}s",
        "--timeout", "10s", "--latency", "-s", str(LUA), f"http://127.0.0.1:{port}{path}",
    ]  # fmt: skip


def run_wrk(processes: Processes, args, server: int, port: int, path: str, body: bytes, seconds: float, during=None):
    """One wrk run against the server whose process is `server`, with the CPU time the server spent per request.

    `during(process)` is called right after wrk starts (the recycle run uses it).
    """
    command = wrk_command(args, port, path, seconds)
    cpu_before = cpu_seconds(server)
    process = processes.start(
        command, env={**os.environ, "BENCH_BODY": body.decode()}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    if during is not None:
        during(process)
    text = process.communicate(timeout=seconds + 60)[0].decode()
    if process.returncode != 0:
        raise RuntimeError(f"wrk exited with {process.returncode}:\n{text}")
    result = parse_wrk(text)
    result["server_cpu_ms_per_request"] = round((cpu_seconds(server) - cpu_before) * 1000 / result["requests"], 3)
    result.update(command=" ".join(command[:-1] + [path]), seconds=seconds, report=text)
    return result


def summary(run: dict) -> str:
    return (
        f"{run['requests_per_s']:.0f} req/s, p50 {ms(run['p50_ms'])}, p99 {ms(run['p99_ms'])}, "
        f"server CPU {ms(run['server_cpu_ms_per_request'])}/request{flag(run)}"
    )


# ---- the two services --------------------------------------------------------------------------------------
def start_ours(processes: Processes, folder: Path, tracking_uri: str, label: str, port: int, log):
    env = {
        **os.environ,
        "WEB_CONCURRENCY": str(WORKERS),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "MLFLOW_TRACKING_URI": tracking_uri,
        "STATE_DIR": str(folder / f"state-{label}"),  # empty: the version is downloaded as on a new machine
        "API_TOKEN": TOKEN,
        "BOOTSTRAP_DEFAULT_MODEL": "false",
        "TRAIN_WARM_START": "false",  # serving only: no warm parent of jobs training a warm-up model meanwhile
        "PROMETHEUS_MULTIPROC_DIR": str(Path(tempfile.mkdtemp(prefix="prometheus-", dir=folder))),
    }
    command = [str(BIN / "gunicorn"), "--config", "gunicorn.conf.py", "wsgi:app"]
    return processes.start(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def start_theirs(processes: Processes, folder: Path, tracking_uri: str, model_uri: str, port: int, log):
    # It runs `uvicorn` by name: the venv's bin on PATH, as in an activated venv.
    path = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": path}
    command = [
        str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
        "-w", str(WORKERS), "-p", str(port), "-h", "127.0.0.1",
    ]  # fmt: skip
    return processes.start(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)


def our_workers(master: int) -> list[int]:
    """gunicorn's workers: the master's children."""
    return children(master)


def their_workers(leader: int) -> list[int]:
    """uvicorn's worker processes under `mlflow models serve` (spawned by multiprocessing)."""
    return [pid for pid in descendants(leader) if "spawn_main" in command_line(pid)]


def all_below(leader: int) -> list[int]:
    """MLServer's processes: its parallel inference workers and whatever else it started."""
    return descendants(leader)


def start_bare_flask(processes: Processes, folder: Path, port: int, log):
    """The bare Flask handler under the service's gunicorn.conf.py (same workers, threads, keep-alive, preload)."""
    env = {
        **os.environ,
        "WEB_CONCURRENCY": str(WORKERS),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "API_TOKEN": TOKEN,
        "PROMETHEUS_MULTIPROC_DIR": str(Path(tempfile.mkdtemp(prefix="prometheus-", dir=folder))),
    }
    command = [str(BIN / "gunicorn"), "--config", "gunicorn.conf.py", "scripts.bench_bare_flask:app"]
    return processes.start(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def ensure_mlserver() -> Path:
    """MLServer's venv, made on first use: returns its bin folder. Its scikit-learn and array libraries are
    this venv's versions, so that it unpickles the same fitted pipeline and computes the same numbers."""
    pins = [f"{name}=={package_version(name)}" for name in ("scikit-learn", "numpy", "pandas", "scipy")]
    requirements = [f"mlserver=={MLSERVER_VERSION}", f"mlserver-sklearn=={MLSERVER_VERSION}", "uvloop<0.22", *pins]
    stamp = MLSERVER_VENV / (".installed-" + "-".join(sorted(requirements)).replace("<", "lt").replace("=", ""))
    if not stamp.exists():
        print(f"[bench] installing MLServer {MLSERVER_VERSION} into {MLSERVER_VENV} (once)", flush=True)
        if not (MLSERVER_VENV / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(MLSERVER_VENV)], check=True)
        subprocess.run([str(MLSERVER_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", *requirements],
                       check=True)  # fmt: skip
        stamp.touch()
    return MLSERVER_VENV / "bin"


def export_for_mlserver(model_uri: str, folder: Path) -> Path:
    """The registered version as MLServer's scikit-learn runtime loads it: a joblib file and its model settings."""
    import joblib
    import mlflow.sklearn

    folder.mkdir(parents=True, exist_ok=True)
    joblib.dump(mlflow.sklearn.load_model(model_uri), folder / "model.joblib")
    settings = {
        "name": "iris",
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib"},
    }
    (folder / "model-settings.json").write_text(json.dumps(settings))
    return folder


def start_mlserver(processes: Processes, mlserver_bin: Path, model_folder: Path, port: int, log):
    settings = {"host": "127.0.0.1", "http_port": port, "grpc_port": free_port(), "metrics_port": free_port(),
                "parallel_workers": WORKERS}  # fmt: skip
    (model_folder / "settings.json").write_text(json.dumps(settings))
    path = os.pathsep.join([str(mlserver_bin), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1"}
    return processes.start([str(mlserver_bin / "mlserver"), "start", str(model_folder)], cwd=model_folder, env=env,
                           stdout=log, stderr=subprocess.STDOUT)  # fmt: skip


def v2_body(row: dict, same_output: bool) -> bytes:
    """MLServer's V2 inference request for one row: one input per column, decoded as a DataFrame."""
    body = {
        "inputs": [{"name": name, "shape": [1], "datatype": "FP64", "data": [value]} for name, value in row.items()],
        "parameters": {"content_type": "pd"},
    }
    if same_output:
        body["outputs"] = [{"name": "predict"}, {"name": "predict_proba"}]
    return json.dumps(body).encode()


def v2_labels(answer: dict) -> list:
    return next(output["data"] for output in answer.get("outputs", []) if output["name"] == "predict")


def measure_server(processes, args, folder, kind: str, start, path: str, body: bytes, workers, extra=None) -> dict:
    """Start one server, time its first answer, load it (cold, warm-up, warm), read its workers' memory."""
    log_path = folder / f"{kind}.log"
    with open(log_path, "wb") as log:
        port = free_port()
        started = time.monotonic()
        process = start(port, log)
        try:
            startup, answer = first_answer(process, started, port, path, body, args.start_timeout)
            cold = run_wrk(processes, args, process.pid, port, path, body, args.cold_seconds)
            print(f"[bench]   first answer {startup:.2f} s after start; cold: {summary(cold)}", flush=True)
            pids_before = sorted(workers(process.pid))
            run_wrk(processes, args, process.pid, port, path, body, args.warmup_seconds)
            profiler = []
            during = None
            if args.profile:
                output = args.out / f"profile-{kind}.txt"
                during = lambda _wrk: profiler.append(start_profiler(processes, workers(process.pid)[0], args, output))  # noqa: E731
            warm = run_wrk(processes, args, process.pid, port, path, body, args.seconds, during=during)
            print(f"[bench]   warm: {summary(warm)}", flush=True)
            if profiler:
                warm["profile"] = finish_profiler(processes, profiler[0], output)
            pids_after = sorted(workers(process.pid))
            result = {
                "start_to_first_answer_s": round(startup, 3),
                "first_answer": answer,
                "cold": cold,
                "warm": warm,
                "workers_replaced_during_warm_up_and_warm_run": len(set(pids_before) - set(pids_after)),
                "worker_memory_mb": [memory_mb(pid) for pid in pids_after],
                "total_pss_mb": total_pss_mb(process.pid),
                "log": str(log_path),
            }
            if extra is not None:
                result.update(extra(process, port))
            return result
        except BaseException:
            log.flush()
            tail = log_path.read_text(errors="replace").splitlines()[-30:]
            print(f"--- last lines of {log_path}:", *tail, sep="\n", file=sys.stderr)
            raise
        finally:
            processes.stop(process)


def start_profiler(processes: Processes, pid: int, args, output: Path) -> subprocess.Popen:
    """py-spy on one worker for the warm run, without pausing it, to collapsed stacks (flamegraph input).

    Only samples of a thread holding the GIL count: the worker's 4 threads otherwise show mostly waiting.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    command = [
        str(BIN / "py-spy"), "record", "--pid", str(pid), "--duration", str(max(1, round(args.seconds))),
        "--rate", "100", "--gil", "--nonblocking", "--format", "raw", "--output", str(output),
    ]  # fmt: skip
    return processes.start(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


_THREAD_FRAMES = (
    "Thread._bootstrap (threading.py)",
    "Thread._bootstrap_inner (threading.py)",
    "Thread.run (threading.py)",
    "_worker (concurrent/futures/thread.py)",
    "_WorkItem.run (concurrent/futures/thread.py)",
)


def finish_profiler(processes: Processes, profiler: subprocess.Popen, output: Path, top: int = 15) -> dict:
    """The share of samples in which each function is on the stack (inclusive) and on top of it (self)."""
    error = profiler.communicate(timeout=60)[1].decode(errors="replace")
    if profiler.returncode != 0 or not output.exists():
        return {"error": error.strip()[-500:]}
    inclusive, own, total = {}, {}, 0
    for line in output.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        count = int(count)
        total += count
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        for frame in set(frames) - set(_THREAD_FRAMES):  # on every stack: they say nothing
            inclusive[frame] = inclusive.get(frame, 0) + count
        own[frames[-1]] = own.get(frames[-1], 0) + count

    def shares(counts: dict) -> list:
        ranked = sorted(counts.items(), key=lambda item: -item[1])[:top]
        return [[frame, round(100 * count / total, 1)] for frame, count in ranked]

    return {
        "samples": total,
        "stacks": str(output),
        "inclusive_percent": shares(inclusive),
        "self_percent": shares(own),
    }


def recycle_run(processes, args, master: int, port: int, path: str, body: bytes) -> dict:
    """wrk while one worker is stopped gracefully half a second in (as max_requests does) and replaced."""
    stopped = []

    def stop_one_worker(_wrk) -> None:
        time.sleep(0.5)
        victim = our_workers(master)[0]
        os.kill(victim, signal.SIGTERM)
        stopped.append(victim)

    result = run_wrk(processes, args, master, port, path, body, args.cold_seconds, during=stop_one_worker)
    print(f"[bench]   one worker recycled: {summary(result)}", flush=True)
    result["stopped_worker"] = stopped[0]
    return result


# ---- the 10,000-row request --------------------------------------------------------------------------------
def batch_body(rows: int) -> bytes:
    """`rows` iris rows with a little noise (as scripts/bench_predict.py builds them), as {"records": [...]}."""
    import numpy as np

    from training.datasets import load_builtin

    iris = load_builtin("iris").features
    sample = iris.sample(rows, replace=True, random_state=0).reset_index(drop=True)
    sample = (sample + np.random.default_rng(0).normal(0, 0.05, sample.shape)).round(3)
    return json.dumps({"records": sample.to_dict(orient="records")}).encode()


def median_ms(function, repeat: int) -> float:
    function()  # once untimed: first-call caches on both sides
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 2)


def batch_request(port: int, body: bytes, repeat: int) -> float:
    """Median wall time (ms) of POST /predict with the batch, keep-alive connection, as a client sees it."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def one() -> None:
        connection.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = response.read()
        if response.status != 200:
            raise RuntimeError(f"/predict with the batch answered {response.status}: {answer[:300]!r}")

    try:
        return median_ms(one, repeat)
    finally:
        connection.close()


def sklearn_in_process(model_uri: str, body: bytes, repeat: int) -> float:
    """Median ms of scikit-learn's own parse + DataFrame + predict_proba on the same registered model."""
    import mlflow.sklearn
    import pandas as pd

    model = mlflow.sklearn.load_model(model_uri)

    def one() -> None:
        model.predict_proba(pd.DataFrame(json.loads(body)["records"]))

    return median_ms(one, repeat)


# ---- the report --------------------------------------------------------------------------------------------
def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def machine(args) -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    memory = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    wrk = subprocess.run([args.wrk, "-v"], capture_output=True, text=True).stdout.splitlines()
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    packages = ("scikit-learn", "mlflow", "gunicorn", "Flask", "uvicorn", "numpy", "pandas", "skops")
    optional = ("onnxruntime", "skl2onnx")
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": model.group(1).strip() if model else platform.processor(),
        "memory_gb": round(int(memory.group(1)) / 1e6, 1) if memory else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": {name: package_version(name) for name in packages + optional},
        "wrk": wrk[0].split(" Copyright")[0] if wrk else "",
        "commit": commit.stdout.strip(),
        "load_average_at_start": os.getloadavg(),
    }


def ms(value: float) -> str:
    return f"{value:.1f} ms" if value >= 1 else f"{value:.2f} ms"


def flag(run: dict) -> str:
    errors = {k: v for k, v in run["errors"].items() if v}
    return " ⚠ " + ", ".join(f"{k} {v}" for k, v in errors.items()) if errors else ""


def cell(run: dict) -> str:
    return (
        f"{run['requests_per_s']:.0f}, {ms(run['p50_ms'])}, {ms(run['p99_ms'])}, "
        f"{ms(run['server_cpu_ms_per_request'])}{flag(run)}"
    )


def same_label(result: dict) -> str:
    ours, theirs = result["ours"]["first_answer"], result["theirs"]["first_answer"]
    return check(ours.get("predictions") == theirs.get("predictions"))


def check(ok: bool) -> str:
    return "yes" if ok else "**no**"


def table(results: dict, info: dict, args) -> str:
    """The markdown the command prints and writes, with the targets of issue 9 checked."""
    connections = f"wrk -t{args.threads} -c{args.connections}, one-row requests"
    lines = [
        f"### `make bench`: this service against `mlflow models serve` ({connections})",
        "",
        "| model | run | this service: req/s, p50, p99, server CPU/request | `mlflow models serve`: the same "
        "| req/s ratio | CPU/request ratio (theirs/ours) | target met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    targets = {"LogisticRegression": 6, "RandomForestClassifier": 15}
    for name, result in results["models"].items():
        ours, theirs = result["ours"], result["theirs"]
        # The runtime the answer names (the compiled path adds it to the answer's model object), if any.
        runtime = (ours["first_answer"].get("model") or {}).get("runtime")
        model = f"{name} ({runtime})" if runtime else name
        for run, label in (("cold", f"cold: first {args.cold_seconds:g} s after the first answer"),
                           ("warm", f"warm: {args.seconds:g} s after a {args.warmup_seconds:g} s warm-up"),
                           ("recycle", f"one worker recycled 0.5 s into {args.cold_seconds:g} s")):  # fmt: skip
            mine = ours[run]
            other = theirs.get(run)
            reference = other or theirs["warm"]
            ratio = mine["requests_per_s"] / reference["requests_per_s"]
            cpu_ratio = reference["server_cpu_ms_per_request"] / mine["server_cpu_ms_per_request"]
            ours_cell = cell(mine)
            theirs_cell = cell(other) if other else "(its workers never recycle; compared with its warm run)"
            verdict = [f"p99 < their p50: {check(mine['p99_ms'] < reference['p50_ms'])}"]
            if run == "warm":
                verdict.insert(0, f"≥ {targets[name]}x: {check(ratio >= targets[name])}")
            lines.append(
                f"| {model} | {label} | {ours_cell} | {theirs_cell} | {ratio:.2f}x | {cpu_ratio:.2f}x | {'; '.join(verdict)} |"
            )
    lines += [
        "",
        "| model | measure | this service | reference | ratio | target met |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, result in results["models"].items():
        ours, theirs, batch = result["ours"], result["theirs"], result["batch"]
        ratio = batch["predict_ms"] / batch["sklearn_ms"]
        lines.append(
            f"| {name} | {args.rows:,} rows in one POST /predict, median of {args.repeat} | "
            f"{ms(batch['predict_ms'])} | scikit-learn's `json.loads` + DataFrame + `predict_proba`: "
            f"{ms(batch['sklearn_ms'])} | {ratio:.2f}x | ≤ 1.5x: {check(ratio <= 1.5)} |"
        )
        start_ratio = ours["start_to_first_answer_s"] / theirs["start_to_first_answer_s"]
        lines.append(
            f"| {name} | process start to first 200 prediction | {ours['start_to_first_answer_s']:.2f} s | "
            f"`mlflow models serve`: {theirs['start_to_first_answer_s']:.2f} s | {start_ratio:.2f}x | "
            f"≤ 0.5x: {check(start_ratio <= 0.5)} |"
        )
        mine = max(w["rss"] for w in ours["worker_memory_mb"])
        other = max(w["rss"] for w in theirs["worker_memory_mb"]) if theirs["worker_memory_mb"] else float("nan")
        lines.append(
            f"| {name} | worker RSS after the load, largest of {WORKERS} (PSS) | {mine:.0f} MB "
            f"({max(w['pss'] for w in ours['worker_memory_mb']):.0f} MB) | `mlflow models serve`: {other:.0f} MB "
            f"({max((w['pss'] for w in theirs['worker_memory_mb']), default=float('nan')):.0f} MB) | "
            f"{mine / other:.2f}x | < 300 MB: {check(mine < 300)} |"
        )
    recycled = {
        name: result["ours"]["workers_replaced_during_warm_up_and_warm_run"]
        for name, result in results["models"].items()
    }
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    profiles = [
        (f"{name}, {side}", result[side]["warm"]["profile"])
        for name, result in results["models"].items()
        for side in ("ours", "theirs")
        if "profile" in result[side]["warm"]
    ]
    lines += [
        "",
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), {info['memory_gb']} GB RAM, Linux {info['kernel']}, "
        f"Python {info['python']}; {versions}; {info['wrk']}. Commit {info['commit']}, {info['date']}; load "
        f"average {info['load_average_at_start'][0]:.2f} at the start, {info['load_average_at_end'][0]:.2f} at the end.",
        "",
        f"Command: `{info['command']}`. Both servers run {WORKERS} workers on the same registered version, one after "
        f"the other; this service: gunicorn with gunicorn.conf.py (POST {args.ours_path}, one-row form), "
        f"`mlflow models serve --env-manager local -w {WORKERS}` (POST /invocations, `dataframe_records`); "
        f"wrk's --timeout is 10 s. Server CPU/request: user + system CPU time of the server's processes during "
        f"the run divided by the requests wrk completed (much less dependent on the machine's other load than "
        f"req/s and latency). Workers of this service replaced by gunicorn's max_requests during the warm-up "
        f"and warm run: {', '.join(f'{name} {count}' for name, count in recycled.items())}. Same label from both "
        f"for the benchmark row: {', '.join(f'{name} {same_label(result)}' for name, result in results['models'].items())}.",
    ]
    for title, profile in profiles:
        lines += [
            "",
            f"Profile of one worker during the warm run, {title} (py-spy, {profile.get('samples')} samples "
            "holding the GIL):",
        ]
        if "error" in profile:
            lines.append(f"py-spy failed: {profile['error']}")
            continue
        lines += ["", "| on the stack (inclusive) | % | on top of the stack (self) | % |", "| --- | --- | --- | --- |"]
        for (frame, share), (own, own_share) in zip(
            profile["inclusive_percent"], profile["self_percent"], strict=False
        ):
            lines.append(f"| `{frame}` | {share} | `{own}` | {own_share} |")
    return "\n".join(lines)


def peers_table(results: dict, args) -> str:
    """This service against MLServer and against the floor (a bare Flask handler), with issue 20's targets."""
    bare = results["bare_flask"]["warm"]
    lines = [
        f"### `make bench`: this service against MLServer {MLSERVER_VERSION} and the floor "
        f"(wrk -t{args.threads} -c{args.connections}, one row, {WORKERS} workers each)",
        "",
        "| model | measure | this service | MLServer, same output (labels and probabilities) | ratio | "
        "MLServer, its default (labels only) | ratio | target met |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    targets = {"LogisticRegression": 5, "RandomForestClassifier": 10}
    for name, result in results["models"].items():
        ours = result["ours"]
        theirs = result.get("mlserver")
        if theirs is None:
            continue
        mine, same, default = ours["warm"], theirs["warm"], theirs["default_output"]
        ratio, default_ratio = (mine["requests_per_s"] / run["requests_per_s"] for run in (same, default))
        lines.append(
            f"| {name} | warm req/s, p50, p99, server CPU/request | {cell(mine)} | {cell(same)} | {ratio:.2f}x | "
            f"{cell(default)} | {default_ratio:.2f}x | ≥ {targets[name]}x: {check(min(ratio, default_ratio) >= targets[name])} |"
        )
        start_ratio = ours["start_to_first_answer_s"] / theirs["start_to_first_answer_s"]
        lines.append(
            f"| {name} | process start to first 200 prediction | {ours['start_to_first_answer_s']:.2f} s | "
            f"{theirs['start_to_first_answer_s']:.2f} s | {start_ratio:.2f}x | | | ≤ 1.0x: {check(start_ratio <= 1.0)} |"
        )
        pss_ratio = ours["total_pss_mb"] / theirs["total_pss_mb"]
        lines.append(
            f"| {name} | total PSS after the load (every process) | {ours['total_pss_mb']:.0f} MB | "
            f"{theirs['total_pss_mb']:.0f} MB | {pss_ratio:.2f}x | | | |"
        )
        same_label = check(ours["first_answer"].get("predictions") == v2_labels(theirs["first_answer"]))
        lines.append(f"| {name} | same label for the benchmark row | | {same_label} | | | | |")
    lines += [
        "",
        "| model | one-row POST /predict, warm | bare Flask handler, same gunicorn settings | share of its req/s "
        "| share by server CPU/request | target met |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, result in results["models"].items():
        mine = result["ours"]["warm"]
        share = mine["requests_per_s"] / bare["requests_per_s"]
        cpu_share = bare["server_cpu_ms_per_request"] / mine["server_cpu_ms_per_request"]
        lines.append(
            f"| {name} | {cell(mine)} | {cell(bare)} | {share:.0%} | {cpu_share:.0%} | ≥ 70 %: {check(share >= 0.7)} |"
        )
    lines += [
        "",
        f"MLServer: `mlserver start` with `parallel_workers` {WORKERS}, the scikit-learn runtime on the same registered "
        "version exported with joblib (read from local disk at start; this service fetches the version from the "
        "registry into an empty state folder), POST /v2/models/iris/infer with one input per column and "
        '`content_type: "pd"`. Same output: `outputs` `predict` and `predict_proba`; default: no `outputs` (labels only).',
    ]
    return "\n".join(lines)


# ---- the run -----------------------------------------------------------------------------------------------
def register_models(tracking_uri: str) -> dict:
    """Train and register both models on iris with the project's training code; nothing activated yet."""
    from kernel.registry import ModelRef, Registry
    from training.datasets import load_builtin
    from training.run import run_training
    from training.spec import TrainingSpec

    registry = Registry(tracking_uri, "model-serving")
    iris = load_builtin("iris")
    refs = {}
    for estimator, params in MODELS:
        result = run_training(registry, TrainingSpec(estimator, params, activate=False), iris)
        refs[estimator] = ModelRef(**result["model"])
    return registry, refs


def bench_model(processes, args, folder: Path, tracking_uri: str, registry, ref, batch: bytes) -> dict:
    registry.set_active_model(ref)  # what this service serves from its start
    model_uri = f"models:/{ref.name}/{ref.version}"
    one_row = json.dumps(IRIS_ROW).encode() if args.ours_path == "/predict" else None
    records = json.dumps({"dataframe_records": [IRIS_ROW]}).encode()
    label = ref.name.split("-", 1)[1]

    def ours_extra(process, port) -> dict:
        extra = {"recycle": recycle_run(processes, args, process.pid, port, args.ours_path, one_row or records)}
        extra["batch_predict_ms"] = batch_request(port, batch, args.repeat)
        return extra

    print(f"[bench] {label}: this service (gunicorn, {WORKERS} workers)", flush=True)
    ours = measure_server(
        processes, args, folder, f"ours-{label}",
        lambda port, log: start_ours(processes, folder, tracking_uri, label, port, log),
        args.ours_path, one_row or records, our_workers, extra=ours_extra,
    )  # fmt: skip
    print(f"[bench] {label}: mlflow models serve ({WORKERS} workers)", flush=True)
    theirs = measure_server(
        processes, args, folder, f"mlflow-{label}",
        lambda port, log: start_theirs(processes, folder, tracking_uri, model_uri, port, log),
        "/invocations", records, their_workers,
    )  # fmt: skip
    result = {"version": ref.as_dict(), "ours": ours, "theirs": theirs}
    if args.mlserver_bin is not None:
        print(f"[bench] {label}: MLServer {MLSERVER_VERSION} ({WORKERS} parallel workers)", flush=True)
        model_folder = export_for_mlserver(model_uri, folder / f"mlserver-{label}")
        v2_path = "/v2/models/iris/infer"
        default_body = v2_body(IRIS_ROW, same_output=False)

        def mlserver_extra(process, port) -> dict:
            default = run_wrk(processes, args, process.pid, port, v2_path, default_body, args.seconds)
            print(f"[bench]   its default output (labels only): {summary(default)}", flush=True)
            return {"default_output": default}

        result["mlserver"] = measure_server(
            processes, args, folder, f"mlserver-{label}",
            lambda port, log: start_mlserver(processes, args.mlserver_bin, model_folder, port, log),
            v2_path, v2_body(IRIS_ROW, same_output=True), all_below, extra=mlserver_extra,
        )  # fmt: skip
    print(f"[bench] {label}: scikit-learn in this process, {args.rows:,} rows", flush=True)
    result["batch"] = {
        "predict_ms": ours.pop("batch_predict_ms"),
        "sklearn_ms": sklearn_in_process(model_uri, batch, args.repeat),
    }
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_seconds = float(os.environ.get("BENCH_SECONDS") or 10)
    parser.add_argument("--seconds", type=float, default=default_seconds, help="warm run (env BENCH_SECONDS)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--ours-path", choices=("/predict", "/invocations"), default="/predict",
                        help="/predict takes the one-row form; /invocations the same dataframe_records body as mlflow")  # fmt: skip
    parser.add_argument("--start-timeout", type=float, default=120.0)
    parser.add_argument("--wrk", default=shutil.which("wrk") or "/usr/bin/wrk")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (store and server logs)")
    parser.add_argument("--no-mlserver", dest="mlserver", action="store_false",
                        help=f"leave out MLServer {MLSERVER_VERSION} (otherwise installed on first use into {MLSERVER_VENV})")  # fmt: skip
    parser.add_argument(
        "--profile",
        action="store_true",
        default=os.environ.get("BENCH_PROFILE", "").lower() in ("1", "true", "yes"),
        help="py-spy one worker of each server during the warm run (env BENCH_PROFILE=1); it costs some CPU",
    )
    args = parser.parse_args()
    args.cold_seconds = min(5.0, args.seconds)
    args.warmup_seconds = min(3.0, args.seconds)
    return args


def main() -> int:
    args = parse_args()
    if not (os.path.isfile(args.wrk) and os.access(args.wrk, os.X_OK)):
        print(f"make bench drives both services with wrk, which is not installed ({args.wrk}): "
              "`sudo apt-get install wrk` (Debian/Ubuntu) or `brew install wrk` (macOS), or pass --wrk PATH.",
              file=sys.stderr)  # fmt: skip
        return 2
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C, even when started in the background
    info = machine(args)
    command = "make bench" if os.environ.get("MAKELEVEL") else "python scripts/bench_serving.py"
    seconds = f"BENCH_SECONDS={os.environ['BENCH_SECONDS']} " if os.environ.get("BENCH_SECONDS") else ""
    info["command"] = seconds + " ".join([command, *sys.argv[1:]])
    folder = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    tracking_uri = f"sqlite:///{folder / 'mlflow.db'}"
    processes = Processes()
    try:
        args.mlserver_bin = ensure_mlserver() if args.mlserver else None
        print(
            f"[bench] the floor: a bare Flask handler under the same gunicorn settings ({WORKERS} workers)", flush=True
        )
        results = {"models": {}}
        results["bare_flask"] = measure_server(
            processes, args, folder, "bare-flask", lambda port, log: start_bare_flask(processes, folder, port, log),
            "/predict", json.dumps(IRIS_ROW).encode(), our_workers,
        )  # fmt: skip
        print(f"[bench] registering LogisticRegression and RandomForest(100) on iris in {folder}", flush=True)
        registry, refs = register_models(tracking_uri)
        batch = batch_body(args.rows)
        for estimator, _ in MODELS:
            results["models"][estimator] = bench_model(
                processes, args, folder, tracking_uri, registry, refs[estimator], batch
            )
    finally:
        processes.stop_all()
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    info["load_average_at_end"] = os.getloadavg()
    markdown = table(results, info, args) + "\n\n" + peers_table(results, args)
    print("\n" + markdown)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(markdown + "\n")
    (args.out / "results.json").write_text(json.dumps({"machine": info, **results}, indent=2) + "\n")
    print(f"\n[bench] written to {args.out / 'results.md'} and {args.out / 'results.json'}")
    failed = [
        f"{name} {side} {run}"
        for name, result in results["models"].items()
        for side in ("ours", "theirs", "mlserver")
        for run in ("cold", "warm", "recycle", "default_output")
        if side in result and run in result[side] and any(result[side][run]["errors"].values())
    ]
    if failed:
        print(f"[bench] runs with errors (flagged ⚠ in the table): {', '.join(failed)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
