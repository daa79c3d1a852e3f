"""`make bench`'s report: the machine it ran on and the markdown tables, with the targets of issues 9 and 20 checked.

Part of scripts/bench_serving.py (`make bench`).
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from scripts.bench_peers import MLSERVER_VERSION, WORKERS, v2_labels
from scripts.bench_processes import ROOT, package_version


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
