"""Drift: the baseline registered with each version, counted online against served rows, and /drift."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest

from kernel.drift_format import BASELINE_TAG, parse_baseline, read_baseline
from serving.drift_counts import VersionCounts, merged, row_cells
from serving.drift_figures import distances, noise_floor, report
from training.baseline import baseline_bytes

CLASSES = ["no", "yes"]


def generate(rows: int, seed: int, shift: float = 0.0) -> pd.DataFrame:
    """Five numbers on different scales (one with 5 % missing), a text of 8 values, a boolean."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "age": rng.normal(40, 12, rows) + shift * 12,
        "income": rng.lognormal(10, 0.5, rows),
        "score": rng.uniform(0, 1, rows),
        "visits": rng.poisson(3, rows).astype(float),
        "tenure": rng.normal(5, 2, rows),
        "country": rng.choice(list("ABCDEFGH"), rows, p=[0.3, 0.2, 0.15, 0.1, 0.1, 0.05, 0.05, 0.05]),
        "member": rng.random(rows) < 0.6,
    })  # fmt: skip
    frame.loc[rng.random(rows) < 0.05, "tenure"] = np.nan
    return frame


def labels_of(frame: pd.DataFrame) -> list:
    return np.where(frame["age"].to_numpy() + 10 * frame["score"].to_numpy() > 45, "yes", "no").tolist()


def columns_of(frame: pd.DataFrame) -> dict:
    """The columns as the service's validator hands them over: JSON values, None for missing."""
    return {name: [None if v is None or (isinstance(v, float) and v != v) else v for v in frame[name].tolist()]
            for name in frame.columns}  # fmt: skip


@pytest.fixture(scope="module")
def baseline_text() -> bytes:
    return baseline_bytes(generate(15_000, seed=1), labels_of(generate(5_000, seed=2)), CLASSES)


@pytest.fixture(scope="module")
def baseline(baseline_text):
    return parse_baseline(baseline_text)


def live_report(baseline, frame: pd.DataFrame, min_rows: int = 500) -> dict:
    counts = VersionCounts(baseline, slot_seconds=60, folder=None)
    for start in range(0, len(frame), 100):  # batches, as clients send them
        batch = frame.iloc[start : start + 100]
        cells, rows = row_cells(baseline, columns_of(batch), labels_of(batch), max_rows=1000)
        counts.add(cells, rows, now=1_000_000.0)
    rows, live = merged(baseline, 3600, 60, None, counts, now=1_000_030.0)
    return report(baseline, rows, live, min_rows, 0.1, 0.25)


def test_the_baseline_holds_counts_not_rows(baseline):
    document = json.loads(baseline_bytes(generate(2_000, seed=3), ["no"] * 10, CLASSES))
    age = document["features"]["age"]
    assert age["kind"] == "number" and len(age["counts"]) == len(age["edges"]) + 1 == 10
    assert sum(age["counts"]) + age["missing"] == 2_000
    assert document["features"]["tenure"]["missing"] > 0
    assert document["features"]["member"] == {"kind": "boolean", "values": document["features"]["member"]["values"],
                                              "missing": 0}  # fmt: skip
    assert set(document["features"]["country"]["values"]) == set("ABCDEFGH")
    assert document["prediction"] == {"classes": {"no": 10, "yes": 0}}
    # Few distinct values: equal deciles merge into fewer bins.
    few = json.loads(baseline_bytes(pd.DataFrame({"x": [0.0, 1.0] * 50}), [], CLASSES))["features"]["x"]
    assert few["edges"] == [0.0, 1.0] and sum(few["counts"]) == 100


@pytest.mark.parametrize("seed", range(20))
def test_rows_from_the_training_distribution_raise_no_warning(baseline, seed):
    result = live_report(baseline, generate(2_000, seed=100 + seed))
    assert result["rows"] == 2_000
    assert result["status"] == "ok", [(f["name"], f["psi"], f["level"]) for f in result["features"]]
    assert all(f["psi"] < 0.1 for f in result["features"])
    assert result["prediction"]["psi"] < 0.1


def test_a_shifted_feature_alerts_and_only_that_one(baseline):
    result = live_report(baseline, generate(2_000, seed=7, shift=3.0))
    by_name = {f["name"]: f for f in result["features"]}
    assert by_name["age"]["level"] == "alert" and by_name["age"]["psi"] > 0.25
    assert by_name["age"]["out_of_range"] > 0
    assert result["features"][0]["name"] == "age"  # sorted by PSI
    assert all(f["psi"] < 0.1 for name, f in by_name.items() if name != "age")
    assert result["status"] == "alert"


def test_rows_from_one_class_move_the_prediction(baseline):
    frame = generate(6_000, seed=9)
    one_class = frame[np.array(labels_of(frame)) == "yes"].head(2_000)
    assert report_prediction(baseline, one_class)["psi"] > 0.25


def report_prediction(baseline, frame):
    return live_report(baseline, frame)["prediction"]


def test_a_small_window_is_insufficient_data(baseline):
    result = live_report(baseline, generate(100, seed=4))
    assert result["status"] == "insufficient_data" and result["rows"] == 100 and result["features"] == []


def test_distances_and_noise_floor():
    same = np.array([10, 20, 30])
    assert distances(same, same) == (0.0, 0.0)
    psi, js = distances(np.array([100, 0, 0]), np.array([0, 0, 100]))
    assert psi > 1 and 0.9 < js <= 1.0
    assert noise_floor(10, 500, 5000) == pytest.approx(9 * (1 / 500 + 1 / 5000))


def test_counts_merge_across_processes_and_old_slots_drop(baseline, tmp_path):
    frame = generate(300, seed=5)
    cells, rows = row_cells(baseline, columns_of(frame), labels_of(frame), max_rows=1000)
    first = VersionCounts(baseline, 60, str(tmp_path))
    first.add(cells, rows, now=6_000.0)
    # Another worker's file (same baseline, another pid): written as that worker would.
    other = tmp_path / f"drift_{baseline.sha256[:12]}_999999.counts"
    other.write_bytes(np.fromfile(next(tmp_path.glob("*.counts")), dtype=np.int64).tobytes())
    total, _ = merged(baseline, 3600, 60, str(tmp_path), first, now=6_010.0)
    assert total == 600
    # Outside the window the slots no longer count; a large batch counts at most max_rows rows.
    assert merged(baseline, 60, 60, str(tmp_path), first, now=6_000.0 + 120)[0] == 0
    assert row_cells(baseline, columns_of(generate(5_000, seed=6)), ["no"] * 5_000, max_rows=1000)[1] == 1000


def test_every_version_registered_gets_a_baseline_matching_its_tag(store, wine_tree, tmp_path):
    registry = store["registry"]
    for ref in (store["default"], wine_tree):  # the bootstrap's, and a job's (python -m training's path)
        tags = registry.client.get_model_version(ref.name, ref.version).tags
        folder = registry.download_model_version(ref, tmp_path / ref.name)
        raw = (folder / "extra_files" / "baseline.json").read_bytes()
        assert hashlib.sha256(raw).hexdigest() == tags[BASELINE_TAG]
        parsed, reason = read_baseline(folder)
        assert parsed is not None and reason == "ok" and parsed.rows > 100


def test_drift_answers_for_the_active_version(client):
    row = client.get("/ready").get_json()["model"]
    for _ in range(3):
        assert (
            client.post(
                "/predict", json={"records": [client.application.extensions["model_store"].get().example] * 20}
            ).status_code
            == 200
        )
    answer = client.get("/drift?window=600").get_json()
    assert answer["window_seconds"] == 600 and answer["scope"] in ("process", "instance")
    [entry] = answer["models"]
    assert (entry["name"], entry["version"]) == (row["name"], row["version"])
    assert entry["rows"] == 60 and entry["status"] == "insufficient_data"
    metrics = client.get("/metrics").get_data(as_text=True)
    assert f'model_drift_rows{{model="{row["name"]}",version="{row["version"]}"}} 60.0' in metrics


@pytest.mark.parametrize("query,field", [("window=abc", "window"), ("window=59", "window"), ("window=99999999", "window"),
                                         ("bogus=1", "bogus")])  # fmt: skip
def test_bad_drift_queries_are_400(client, query, field):
    answer = client.get(f"/drift?{query}")
    assert answer.status_code == 400
    assert answer.get_json()["error"] == "invalid_input" and field in answer.get_json()["errors"]


def test_a_version_not_served_is_404(client):
    answer = client.get("/drift?name=nope&version=1")
    assert answer.status_code == 404 and answer.get_json()["error"] == "not_served"


@pytest.mark.parametrize("seed", range(5))
def test_the_plain_python_and_numpy_paths_count_the_same_cells(baseline, seed):
    frame = generate(30, seed=200 + seed, shift=2.0 * (seed % 2))
    frame.loc[frame.index[:3], "country"] = ["Z", None, "A"]  # an unseen value, a missing one
    frame.loc[frame.index[3], "age"] = baseline.feature("age").edge_list[4]  # exactly on an edge
    columns, labels = columns_of(frame), labels_of(frame)
    from serving.drift_counts import small_cells

    assert sorted(small_cells(baseline, columns, labels)) == sorted(row_cells(baseline, columns, labels, 1000)[0])


def test_lambda_environments_emit_emf_lines_that_merge(baseline, baseline_text, tmp_path, monkeypatch):
    """Each Lambda environment prints EMF and raw count lines; the merge CLI sums environments exactly."""
    import io
    import types

    from serving import drift_emf
    from serving.drift import DriftMonitor

    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "model-serving")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.setattr(drift_emf, "EMIT_SECONDS", 0.0)
    settings = types.SimpleNamespace(DRIFT_ENABLED=True, DRIFT_WINDOW_SECONDS=3600, DRIFT_MAX_ROWS_PER_REQUEST=1000,
                                     DRIFT_MIN_ROWS=500, DRIFT_PSI_WARN=0.1, DRIFT_PSI_ALERT=0.25)  # fmt: skip
    model = types.SimpleNamespace(ref=types.SimpleNamespace(name="m", version="3"), baseline=baseline,
                                  baseline_reason="ok")  # fmt: skip
    logs = []
    for environment in range(3):  # three environments, 400 shifted rows each
        out = io.StringIO()
        monitor = DriftMonitor(settings)
        monitor.emitter.out = out
        frame = generate(400, seed=300 + environment, shift=3.0)
        monitor.observe(model, columns_of(frame), labels_of(frame))
        lines = out.getvalue().splitlines()
        emf = json.loads(lines[0])
        assert emf["_aws"]["CloudWatchMetrics"][0]["Namespace"] == drift_emf.NAMESPACE
        assert (emf["model"], emf["version"], emf["DriftRows"], emf["status"]) == ("m", "3", 400, "insufficient_data")
        logs += lines
    (tmp_path / "baseline.json").write_bytes(baseline_text)
    (tmp_path / "cloudwatch.log").write_text("START RequestId: 1\n" + "\n".join(logs) + "\n")
    merged_entry = drift_emf.merge(logs, baseline_text)
    assert merged_entry["environments"] == 3 and merged_entry["rows"] == 1200
    assert {f["name"]: f["level"] for f in merged_entry["features"]}["age"] == "alert"
    # The CLI (`python -m serving.drift merge`) reads an export of the log group, other lines included.
    from serving.drift_report import main

    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    assert main(["merge", "--baseline", str(tmp_path / "baseline.json"), str(tmp_path / "cloudwatch.log")]) == 0
    assert json.loads(out.getvalue()) == json.loads(json.dumps(merged_entry))
