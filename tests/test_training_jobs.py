"""POST /train's jobs and GET /train/jobs/<id>: queued, capacity, phases, reading a job, its log, time limit,
killed and retried attempts, the warm parent, concurrent attempts of one job."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time
from pathlib import Path

import pytest

from kernel.refs import ModelRef
from service import create_app
from tests.conftest import client_of, mlflow_client, ref
from tests.training_helpers import fitting_pid, slow_job, version_count, wait_done
from training.job_record import JOB_PHASES as PHASES
from training.job_record import QUEUED_GRACE_SECONDS, JobRecord


def test_job_is_queued_then_succeeds(client, store):
    response = client.post("/train", json={"estimator": "GaussianNB", "dataset": "breast_cancer"})
    assert response.status_code == 202
    assert response.json["status"] == "queued"
    assert response.headers["Location"] == response.json["location"] == f"/train/jobs/{response.json['job_id']}"
    job = wait_done(client, response.json["location"])
    assert job["status"] == "succeeded", job
    assert job["result"]["model"]["name"] == "breast_cancer-GaussianNB"
    assert store["registry"].get_active_model().name == "breast_cancer-GaussianNB"


def test_jobs_beyond_capacity_wait_queued_then_429(store, app_config):
    app = create_app({**app_config, "TRAIN_WORKER_CONCURRENCY": 1, "TRAIN_MAX_QUEUED": 1})
    client = client_of(app)
    slot = Path(app_config["STATE_DIR"]) / "train-slots" / "slot-0.lock"
    slot.parent.mkdir(parents=True, exist_ok=True)
    with open(slot, "a") as held:  # a running job holds the machine's only slot
        fcntl.flock(held, fcntl.LOCK_EX)
        first = client.post("/train", json={"estimator": "GaussianNB", "dataset": "iris", "activate": False})
        assert first.status_code == 202, first.json
        posted = time.time()
        time.sleep(1.5)
        waiting = client.get(first.json["location"]).json
        assert waiting["status"] == "queued"
        assert waiting["waited_seconds"] >= 1.5
        # Its process has it: no sweeper takes it for a job the API never started.
        state = JobRecord(store["registry"], first.json["job_id"]).read()
        assert state.sent_at is not None and not state.never_sent(time.time() + QUEUED_GRACE_SECONDS + 1)
        refused = client.post("/train", json={"estimator": "GaussianNB", "dataset": "iris"})
        assert refused.status_code == 429
        assert refused.headers["Retry-After"]
        assert refused.json["error"] == "too_many_jobs"
        released = time.time()
    job = wait_done(client, first.json["location"])
    done = time.time()
    assert job["status"] == "succeeded", job
    # It started only once the slot was free: it waited at least as long as the slot was held after it was queued,
    # and ran no longer than from then until now.
    assert job["waited_seconds"] >= max(1.5, released - posted), (job, released - posted)
    assert job["attempt"] == 1 and 0 < job["elapsed_seconds"] <= done - released, (job, done - released)


def test_running_job_shows_its_phase_and_elapsed_time(client, store):
    body = {**slow_job(activate=False), "params": {"n_estimators": 60}}
    submitted = time.time()
    location = client.post("/train", json=body).json["location"]
    deadline = time.monotonic() + 240
    seen, last = set(), None
    while True:
        job = client.get(location).json
        since = time.time() - submitted  # the job started after it was submitted: it cannot have run longer
        if job["status"] in ("succeeded", "failed"):
            break
        if job["status"] == "running":
            assert job["phase"] in PHASES
            # The phase began within the attempt, which began after the request; both clocks move on.
            assert 0 <= job["phase_elapsed_seconds"] <= job["elapsed_seconds"] + 0.001 <= since + 0.002, (job, since)
            if last is not None:
                assert job["elapsed_seconds"] > last["elapsed_seconds"], (last, job)
                if job["phase"] == last["phase"]:
                    assert job["phase_elapsed_seconds"] > last["phase_elapsed_seconds"], (last, job)
            seen.add(job["phase"])
            last = job
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert job["status"] == "succeeded" and "fitting" in seen, (job, seen)
    # Every phase the job went through is one the API documents (a phase missing there failed the fuzz run).
    documented = client.get("/openapi.json").json["components"]["schemas"]["Job"]["properties"]["phase"]["enum"]
    assert list(job["phases"]) == list(PHASES) and set(PHASES) < set(documented), (job["phases"], documented)
    # (A read while the outcome was being written may have seen the job running a few ms past its finished_at.)
    assert last["elapsed_seconds"] - 0.5 <= job["elapsed_seconds"] <= since, (last, job, since)
    assert job["finished_at"]


def test_reading_a_job_writes_nothing(client, store):
    body = {"estimator": "GaussianNB", "dataset": "iris", "activate": False}
    location = client.post("/train", json=body).json["location"]
    job = wait_done(client, location)
    tracking = mlflow_client(store["uri"])
    before = tracking.get_run(job["job_id"]).data.tags
    for _ in range(3):
        assert client.get(location).json == job
    assert tracking.get_run(job["job_id"]).data.tags == before


def test_reading_an_activated_job_serves_its_version_here_and_writes_nothing(client, store):
    """GET /train/jobs/<id> of a job that activated its version: this machine serves it from that read on (the
    inference half's `catch_up`; WATCH_REGISTRY is off here), and reads write no tag, version or alias."""
    name = "iris-read-your-writes"
    body = {"estimator": "GaussianNB", "dataset": "iris", "model_name": name}
    location = client.post("/train", json=body).json["location"]
    try:
        job = wait_done(client, location)
        assert job["status"] == "succeeded" and job["result"]["activated"], job
        trained = job["result"]["model"]
        served = client.post("/predict", json={}).json["example"]
        assert ref(client.post("/predict", json=served).json["model"]) == trained
        tracking, registry = mlflow_client(store["uri"]), store["registry"]

        def written() -> tuple:
            versions = sorted((v.name, str(v.version), tuple(sorted(v.tags.items())), v.last_updated_timestamp)
                              for v in registry.search_model_versions())  # fmt: skip
            return tracking.get_run(job["job_id"]).data.tags, versions, registry.read_alias_state().holders

        before = written()
        for _ in range(3):
            assert client.get(location).json == job
        assert written() == before
        assert [v[:2] for v in before[1] if v[0] == name] == [(name, "1")] and before[2] == (ModelRef(name, "1"),)
    finally:
        store["registry"].set_active_model(store["default"])


def test_catch_up_loads_only_the_version_the_alias_names_and_never_bootstraps(app, store, wine_tree, tmp_path):
    """The training half's hook: for a version the alias does not name, this machine keeps what it serves; on an
    empty registry it registers nothing. A bootstrap (the service's start, never a read) fails the test."""

    def bootstrap():
        pytest.fail("catch_up bootstrapped")

    model_store = app.extensions["model_store"]
    model_store.bootstrap = bootstrap
    assert model_store.get().ref == store["default"] != wine_tree
    app.extensions["catch_up"](wine_tree)  # registered, not active
    assert model_store.get().ref == store["default"] and store["registry"].get_active_model() == store["default"]
    folder = tmp_path / "empty"  # its own registry and state folder (`app`'s is tmp_path / "state")
    empty = create_app({"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}", "STATE_DIR": str(folder / "state"),
                        "WATCH_REGISTRY": False, "BOOTSTRAP_DEFAULT_MODEL": False})  # fmt: skip
    try:
        registry, empty_store = empty.extensions["registry"], empty.extensions["model_store"]
        empty_store.bootstrap = bootstrap
        assert registry.search_model_versions() == [] and empty_store.get() is None
        empty.extensions["catch_up"](ModelRef("iris-RandomForestClassifier", "1"))
        assert registry.search_model_versions() == [] and empty_store.get() is None
    finally:
        empty_store.stop()


def test_a_jobs_log_lines_carry_its_id(client, app_config):
    """The local executor's job logs to STATE_DIR/jobs/<id>.log in the service's format, its id on every line."""
    body = {"estimator": "GaussianNB", "dataset": "iris", "activate": False, "wait": True}
    response = client.post("/train", json=body)
    assert response.status_code == 201, response.json
    job_id = response.headers["Location"].rsplit("/", 1)[1]
    folder = Path(app_config["STATE_DIR"]) / "jobs"
    deadline = time.monotonic() + 30  # the job's process removes its lock file once it has nothing left to log
    while (folder / f"{job_id}.lock").exists():
        assert time.monotonic() < deadline, "the job's process did not finish"
        time.sleep(0.1)
    lines = [json.loads(line) for line in (folder / f"{job_id}.log").read_text().splitlines() if line.startswith("{")]
    messages = [line["message"] for line in lines]
    assert any("attempt 1 starts" in m for m in messages) and any("attempt 1 succeeded" in m for m in messages)
    assert all(line.get("job_id") == job_id for line in lines), lines


def test_job_over_its_time_limit_fails_and_registers_nothing(store, app_config):
    app = create_app({**app_config, "TRAIN_TIME_LIMIT_SECONDS": 1})
    client = client_of(app)
    before = version_count(store)
    response = client.post("/train", json=slow_job())
    job = wait_done(client, response.json["location"])
    assert job["status"] == "failed"
    assert "time limit" in job["error"]
    assert version_count(store) == before
    assert mlflow_client(store["uri"]).get_run(job["job_id"]).info.status == "FAILED"


def test_killed_job_is_reported_failed(store, app_config):
    app = create_app({**app_config, "TRAIN_MAX_ATTEMPTS": 1})
    client = client_of(app)
    before = version_count(store)
    location = client.post("/train", json=slow_job()).json["location"]
    run_id = location.rsplit("/", 1)[1]
    os.kill(fitting_pid(mlflow_client(store["uri"]), run_id), signal.SIGKILL)
    job = wait_done(client, location, timeout=60)
    assert job["status"] == "failed"
    assert "was lost" in job["error"] and "No attempts left" in job["error"]
    deadline = time.monotonic() + 30  # the job's process exits once it has recorded the failure
    while [p for p in os.listdir("/proc") if p.isdigit() and _is_job_of(p, run_id)]:
        assert time.monotonic() < deadline, "a process of the failed job survived"
        time.sleep(0.2)
    assert version_count(store) == before


def test_killed_attempt_is_retried_and_registers_one_version(store, app_config):
    app = create_app({**app_config, "TRAIN_MAX_ATTEMPTS": 2})
    client = client_of(app)
    body = {"estimator": "GradientBoostingClassifier", "params": {"n_estimators": 60}, "dataset": "digits",
            "activate": False, "model_name": "digits-retried"}  # fmt: skip
    location = client.post("/train", json=body).json["location"]
    run_id = location.rsplit("/", 1)[1]
    os.kill(fitting_pid(mlflow_client(store["uri"]), run_id), signal.SIGKILL)
    job = wait_done(client, location, timeout=120)
    assert job["status"] == "succeeded", job
    assert job["attempt"] == 2
    assert "Attempt 1" in job["lost_attempt"]
    assert len(mlflow_client(store["uri"]).search_model_versions(f"run_id = '{run_id}'")) == 1


def _parent_and_command(pid: int) -> tuple[int, str]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return int(stat.rsplit(")", 1)[1].split()[1]), command


def test_job_process_is_forked_by_the_warm_parent(store, app_config):
    """A job's process is a child of the fork server (which imported the training code), not a fresh Python:
    the attempt's parent is the job's own process, named for its job, whose parent is the fork server."""
    app = create_app({**app_config, "TRAIN_MAX_ATTEMPTS": 1})
    executor = app.extensions["train_executor"]
    executor.start_fork_server()
    deadline = time.monotonic() + 120
    while not executor.fork_server.is_up():  # started in the background: the first jobs before it run cold
        assert time.monotonic() < deadline, "the fork server did not come up"
        time.sleep(0.2)
    client = client_of(app)
    location = client.post("/train", json=slow_job(activate=False)).json["location"]
    run_id = location.rsplit("/", 1)[1]
    attempt = fitting_pid(mlflow_client(store["uri"]), run_id)
    job_process, attempt_command = _parent_and_command(attempt)
    server, job_command = _parent_and_command(job_process)
    assert job_command.startswith(f"training job {run_id}"), job_command
    assert os.getsid(job_process) == job_process  # its own session: killable alone, outlives the service
    assert "-m training.fork_server" in _parent_and_command(server)[1]
    assert str(executor.fork_server.socket_path) in _parent_and_command(server)[1]
    assert wait_done(client, location)["status"] == "succeeded"


def _is_job_of(pid: str, run_id: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return run_id.encode() in cmdline.read()
    except OSError:
        return False


# ---- concurrent attempts of one job (a broker's redelivery while the first taker still works) -----------
def _new_job(registry, estimator="DecisionTreeClassifier", dataset="iris", **params) -> str:
    from training.spec import TrainingSpec
    from training.submitter import create_job

    return create_job(registry, TrainingSpec(estimator, params, activate=False), dataset, max_queued=100)


def test_a_redelivery_while_the_attempt_beats_leaves_the_job_to_it(store):
    """A second delivery finds attempt 1 heard from within the lease: it writes nothing and says busy;
    once the lease has passed without a beat, the next delivery takes over and records the lost one."""
    from training.attempt import LEASE_SECONDS, AttemptOutcome, execute_job

    registry = store["registry"]
    job_id = _new_job(registry)
    beat = repr(time.time() - 2)
    registry.set_run_tags(job_id, {"job.status": "running", "job.attempt": "1", "job.attempt_id": "first",
                                   "job.worker": "elsewhere:1", "job.started_at": beat, "job.heartbeat_at": beat})  # fmt: skip
    before = registry.client.get_run(job_id).data.tags
    assert execute_job(registry, job_id, 2, "here:2", 60) is AttemptOutcome.BUSY
    assert registry.client.get_run(job_id).data.tags == before

    stale = repr(time.time() - LEASE_SECONDS - 1)
    registry.set_run_tags(job_id, {"job.started_at": stale, "job.heartbeat_at": stale})
    assert execute_job(registry, job_id, 2, "here:2", 60) is AttemptOutcome.SUCCEEDED
    tags = registry.client.get_run(job_id).data.tags
    assert tags["job.attempt"] == "2" and "Attempt 1 on elsewhere:1 was lost" in tags["job.lost"]
    assert len(registry.client.search_model_versions(f"run_id = '{job_id}'")) == 1


def test_a_superseded_attempt_stops_and_registers_nothing(store):
    """Another attempt took the job over while this one fitted: it stops at its next phase, registers
    nothing and writes no outcome; the record stays the new owner's."""
    import threading

    from training.attempt import AttemptOutcome, execute_job

    registry = store["registry"]
    job_id = _new_job(registry, "GradientBoostingClassifier", "digits", n_estimators=60)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=execute_job(registry, job_id, 2, "here:1", 120)))
    thread.start()
    deadline = time.monotonic() + 60
    while registry.client.get_run(job_id).data.tags.get("job.phase") != "fitting":
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.05)
    registry.client.set_tag(job_id, "job.attempt_id", "the-new-owner")
    thread.join(timeout=120)
    assert outcome["result"] is AttemptOutcome.SUPERSEDED
    tags = registry.client.get_run(job_id).data.tags
    assert tags["job.status"] == "running" and tags["job.attempt_id"] == "the-new-owner"
    assert "model_version" not in tags
    assert registry.client.search_model_versions(f"run_id = '{job_id}'") == []


def test_a_superseded_attempt_withdraws_the_version_it_registered_and_activated(store, monkeypatch):
    """Taken over after registering (the job activates its version, then another attempt owns the job):
    the version goes, and the active model goes back to the previous one."""
    from kernel.registry import ModelRef
    from training.attempt import AttemptOutcome, execute_job
    from training.spec import TrainingSpec
    from training.submitter import create_job

    registry = store["registry"]
    registry.set_active_model(store["default"])
    activate = registry.set_active_model
    seen = {}

    def activate_then_lose_the_job(ref):
        activate(ref)
        if not seen:  # the job's own activation; the second call is the hand-back
            seen.update(activated=ref, versions=registry.client.search_model_versions(f"run_id = '{job_id}'"))
            registry.client.set_tag(job_id, "job.attempt_id", "the-new-owner")

    try:
        job_id = create_job(registry, TrainingSpec("DecisionTreeClassifier", model_name="withdrawn"), "iris", 100)
        monkeypatch.setattr(registry, "set_active_model", activate_then_lose_the_job)
        assert execute_job(registry, job_id, 1, "here:1", 60) == AttemptOutcome.SUPERSEDED
        monkeypatch.undo()
        # It had registered and activated its version before it was taken over ...
        assert seen["activated"].name == "withdrawn"
        registered = [ModelRef(mv.name, str(mv.version)) for mv in seen["versions"]]
        assert registered == [seen["activated"]]
        # ... and the version is gone, the previous model active again, the record the new owner's.
        assert registry.client.search_model_versions(f"run_id = '{job_id}'") == []
        assert registry.get_active_model() == store["default"]
        tags = registry.client.get_run(job_id).data.tags
        assert tags["job.status"] == "running" and tags["job.attempt_id"] == "the-new-owner"
        assert ModelRef(tags["model_name"], tags["model_version"]) == seen["activated"]
    finally:
        monkeypatch.undo()
        registry.set_active_model(store["default"])
