"""How `make bench` loads and measures a server: wrk runs (with the server's CPU time per request), one server
from start to first answer through its cold, warm and recycle runs and memory, py-spy on a worker, and the
10,000-row request against scikit-learn in this process.

Part of scripts/bench_serving.py (`make bench`).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from scripts.bench_peers import our_workers
from scripts.bench_processes import BIN, Processes, cpu_seconds, first_answer, free_port, memory_mb, total_pss_mb
from scripts.bench_report import flag, ms

LUA = Path(__file__).resolve().parent / "bench_post.lua"


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


# ---- one server, measured ----------------------------------------------------------------------------------
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
