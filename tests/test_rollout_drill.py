"""Rollouts decided by the service itself, across two instances: an `mlflow server` and two gunicorn instances of
2 workers each, reporting to the rollout's run every second (serving/rollout_owner.py).

- a canary steps from 10 % to 50 % on its own, the owner stopped mid-way is replaced within the lease, a
  restarted instance keeps every key's arm, and the promotion moves the alias for every worker of both;
- a candidate that raises on a category it never saw (20 % of the rows) is rolled back early, long before
  its step's minimum, no client ever sees a 5xx, and the evidence is in MLflow.
"""

from __future__ import annotations

import json
import random
import threading
import time

import pytest
import requests

from tests.conftest import AUTH, mlflow_client
from tests.rollout_fleet import (
    ENV,
    LEASE,
    NAME,
    Registry,
    Service,
    predict,
    register,
    rollout,
    row,
    start_rollout,
    traffic_until,
    version_tags,
    worker_pids,
)  # fmt: skip

pytestmark = pytest.mark.drill


@pytest.fixture(scope="module")
def registry_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rollout-drill")
    server = Registry(folder)
    try:
        register(server.uri)
        client = mlflow_client(server.uri)
        client.set_registered_model_alias(NAME, "active", "1")
        yield {"uri": server.uri, "folder": folder, "client": client, "server": server}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def instances(registry_server):
    folder, started = registry_server["folder"], []
    try:
        for index in range(2):
            env = {**ENV, "MLFLOW_TRACKING_URI": registry_server["uri"], "STATE_DIR": str(folder / f"state-{index}")}
            started.append(Service(env, folder, workers=2).start())
        yield started
    finally:
        for service in started:
            service.stop()


@pytest.fixture
def stable_active(registry_server, instances):
    """Each test starts with version 1 active and no rollout on either instance (each has read so: a request it
    answers is never routed by an earlier test's rollout); a rollout left running is cancelled after it."""
    client = registry_server["client"]
    client.set_registered_model_alias(NAME, "active", "1")
    deadline = time.monotonic() + 30
    while any(rollout(service)["state"] != "none" or predict(service, "k", row(random.Random(0))).headers[
            "X-Model-Version"] != "1" for service in instances):  # fmt: skip
        assert time.monotonic() < deadline, [rollout(service) for service in instances]
        time.sleep(0.2)
    yield client
    for service in instances:
        if service.process is None:
            service.start()
    requests.delete(f"{instances[0].url}/rollout", headers=AUTH, timeout=30)
    client.set_registered_model_alias(NAME, "active", "1")


def test_a_canary_steps_survives_its_owner_keeps_every_key_and_promotes(registry_server, instances, stable_active):
    client, (first, second) = stable_active, instances
    body = {"candidate": {"name": NAME, "version": "2"}, "mode": "canary", "steps": [10, 50],
            "step_min_requests": 30, "step_min_seconds": 2, "auto_promote": False,
            "sticky": {"header": "X-User-Id"}}  # fmt: skip
    started = start_rollout(first, body)
    arms: dict[str, str] = {}

    def both_report():
        state = rollout(first)
        return state if state["state"] == "running" and len(state["instances_reporting"]) == 2 else None

    rid = started["rollout"]["id"]
    state = traffic_until(instances, both_report, 60, arms, rollout_id=rid)
    owner = state["owner"]["instance"]
    owning, other = (first, second) if f"-{first.process.pid}-" in owner else (second, first)
    assert f"-{owning.process.pid}-" in owner, (owner, first.process.pid, second.process.pid)
    at_ten = {key for key, route in arms.items() if route == "candidate"}
    owning.stop()
    stopped = time.monotonic()

    def taken_over():
        state = rollout(other)
        return state if (state.get("owner") or {}).get("instance", owner) != owner else None

    traffic_until([other], taken_over, LEASE + 20, arms, rollout_id=rid)
    took = time.monotonic() - stopped
    print(f"\nthe owner stopped: the other instance took the decisions over after {took:.1f} s (lease {LEASE} s)")
    assert took <= LEASE + 2 * 1 + 5, took  # the lease, a report and a poll on each side, and slack
    passed = traffic_until([other], lambda: (s := rollout(other))["state"] == "passed" and s, 120, arms, rollout_id=rid)
    assert passed["percent"] == 50 and "step 2 of 2 (50 %) passed" in passed["reason"], passed
    assert at_ten <= {key for key, route in arms.items() if route == "candidate"}, "a key left the candidate at 50 %"
    assert version_tags(client, "2")["rollout.state"] == "passed"
    generator = random.Random(3)
    keys = [f"user-{i}" for i in range(100)]
    now = {key: predict(other, key, row(generator)).headers["X-Model-Route"] for key in keys}
    owning.start()  # a restarted instance rejoins: every key keeps its arm
    assert {key: predict(owning, key, row(generator)).headers["X-Model-Route"] for key in keys} == now
    promoted = requests.post(f"{first.url}/rollout/promote", headers=AUTH, timeout=30)
    assert promoted.status_code == 200 and promoted.json()["state"] == "promoted", promoted.text
    assert client.get_model_version_by_alias(NAME, "active").version == "2"
    for service in instances:
        deadline = time.monotonic() + 30
        while {predict(service, f"k{i}", row(generator)).headers["X-Model-Version"] for i in range(20)} != {"2"}:
            assert time.monotonic() < deadline, service.log_tail()
    run = client.get_run(passed["rollout"]["run_id"])
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "candidate_requests")}
    assert steps == {0, 1} and run.data.tags["rollout.state"] == "promoted", (steps, run.data.tags)


def test_a_failing_candidate_is_rolled_back_early_and_no_client_sees_it(registry_server, instances, stable_active):
    client = stable_active
    body = {
        "candidate": {"name": NAME, "version": "3"},
        "mode": "canary",
        "steps": [50],
        "sticky": {"header": "X-User-Id"},
    }  # fmt: skip  (the default minimum: 1,000 requests, 300 s)
    started = start_rollout(instances[0], body)
    run_id = started["rollout"]["run_id"]

    def rolled_back():
        return version_tags(client, "3").get("rollout.state") == "rolled_back"

    begun = time.monotonic()
    traffic_until(instances, rolled_back, 90, {}, keys=1000, gold=0.2, seed=5)
    print(f"\nthe failing candidate was rolled back after {time.monotonic() - begun:.1f} s")
    reason = version_tags(client, "3")["rollout.reason"]
    assert reason.startswith("rolled back early: the candidate failed"), reason
    decision = json.loads(client.get_run(run_id).data.tags["rollout.decision"])
    assert decision["action"] == "rollback" and decision["reason"] == reason
    assert client.get_model_version_by_alias(NAME, "active").version == "1"
    for service in instances:  # every worker follows the rollback: the active version answers, no arm
        deadline = time.monotonic() + 30
        while {predict(service, f"user-{i}", row(random.Random(i))).headers["X-Model-Route"] for i in range(40)} != {
            "active"}:  # fmt: skip
            assert time.monotonic() < deadline, service.log_tail()


def test_with_mlflow_killed_routing_holds_nothing_is_decided_and_it_resumes(registry_server, instances, stable_active):
    client, server = stable_active, registry_server["server"]
    body = {"candidate": {"name": NAME, "version": "2"}, "mode": "canary", "steps": [10, 50],
            "step_min_requests": 10, "step_min_seconds": 3, "auto_promote": True,
            "sticky": {"header": "X-User-Id"}}  # fmt: skip
    started = start_rollout(instances[0], body)
    arms: dict[str, str] = {}
    rid = started["rollout"]["id"]
    running = lambda: all(rollout(s).get("rollout", {}).get("id") == rid for s in instances)  # noqa: E731
    traffic_until(instances, running, 30, arms, rollout_id=rid)
    server.kill()
    try:
        down = time.monotonic()
        # Three times the step's minimum seconds, and many more requests than its minimum: nothing is decided.
        traffic_until(instances, lambda: time.monotonic() - down > 10, 60, arms, keys=400, rollout_id=rid)
        assert "candidate" in arms.values() and "stable" in arms.values()
        for service in instances:
            state = rollout(service)
            assert state["state"] == "running" and state["percent"] == 10, state
            assert (state["last_decision"] or {}).get("action") in (None, "wait"), state
    finally:
        server.restart()
    begun = time.monotonic()

    def promoted():
        return client.get_model_version_by_alias(NAME, "active").version == "2"

    traffic_until(instances, promoted, 120, arms, keys=400, rollout_id=rid)
    print(f"\nwith MLflow back, the canary stepped and was promoted {time.monotonic() - begun:.1f} s later")
    steps = {m.step for m in client.get_metric_history(started["rollout"]["run_id"], "candidate_requests")}
    assert steps == {0, 1}, steps


def test_a_sticky_canary_splits_keys_alike_on_both_instances(registry_server, instances, stable_active):
    """10 %: 2,000 distinct keys over both instances land 10 ± 2 % on the candidate, and 500 of them replayed on
    the other instance keep their arm (a hash of rollout id and key: no shared state)."""
    body = {"candidate": {"name": NAME, "version": "2"}, "mode": "canary", "steps": [10],
            "step_min_requests": 1_000_000, "sticky": {"header": "X-User-Id"}}  # fmt: skip
    started = start_rollout(instances[0], body)
    rid = started["rollout"]["id"]
    traffic_until(instances, lambda: all(rollout(s).get("rollout", {}).get("id") == rid for s in instances), 30, {})
    generator = random.Random(11)
    with requests.Session() as first, requests.Session() as second:
        sessions = ((first, instances[0]), (second, instances[1]))

        def route(index: int, key: str) -> str:
            session, service = sessions[index % 2]
            answer = session.post(f"{service.url}/predict", json=row(generator), headers={"X-User-Id": key}, timeout=30)
            assert answer.status_code == 200, answer.text
            return answer.headers["X-Model-Route"]

        arms = {f"key-{i}": route(i, f"key-{i}") for i in range(2000)}
        share = sum(arm == "candidate" for arm in arms.values()) / len(arms)
        assert 0.08 <= share <= 0.12, share
        replayed = {f"key-{i}": route(i + 1, f"key-{i}") for i in range(500)}  # on the other instance
    assert replayed == {key: arms[key] for key in replayed}


def test_a_shadow_with_a_queue_of_one_under_sixteen_clients_counts_its_drops(registry_server, stable_active):
    """Every client gets its answer; each request is either scored by the candidate or dropped and counted."""

    env = {**ENV, "MLFLOW_TRACKING_URI": registry_server["uri"], "SHADOW_QUEUE": "1",
           "STATE_DIR": str(registry_server["folder"] / "state-queue-of-one")}  # fmt: skip
    service = Service(env, registry_server["folder"], workers=2).start()
    try:
        body = {"candidate": {"name": NAME, "version": "2"}, "mode": "shadow", "shadow_percent": 100}
        start_rollout(service, body)
        statuses: list[int] = []

        def client(seed: int) -> None:
            generator = random.Random(seed)
            with requests.Session() as session:
                for _ in range(50):
                    statuses.append(session.post(f"{service.url}/predict", json=row(generator), timeout=30).status_code)

        threads = [threading.Thread(target=client, args=(seed,)) for seed in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert statuses == [200] * 800
        deadline = time.monotonic() + 30
        while True:  # the shadow threads finish what they hold
            shadow = rollout(service)["this_instance"]["shadow"]
            if shadow["requests"] + shadow["dropped"] == 800:
                break
            assert time.monotonic() < deadline, (shadow, service.log_tail())
            time.sleep(0.2)
        print(f"\nqueue of 1, 16 clients: {shadow['requests']} of 800 requests shadowed, {shadow['dropped']} dropped")
        assert shadow["dropped"] > 0 and shadow["errors"] == 0
    finally:
        requests.delete(f"{service.url}/rollout", headers=AUTH, timeout=30)
        service.stop()


def test_an_alias_moved_by_an_mlflow_client_reaches_every_worker_of_both_instances(registry_server, instances,
                                                                                  stable_active):  # fmt: skip
    """The bound: ACTIVE_POLL_SECONDS (1 here) + the load time + 0.2 s; the load time is allowed 15 s, as in
    tests/test_alias.py. Each worker is asked on a new connection until its answer names version 2."""
    client, generator = stable_active, random.Random(5)
    pending = {(service.url, pid) for service in instances for pid in worker_pids(service.process.pid)}
    assert len(pending) == 4
    moved = time.monotonic()
    client.set_registered_model_alias(NAME, "active", "2")
    reached = {}
    while pending:
        for url in {url for url, _ in pending}:
            answer = requests.post(f"{url}/predict", json=row(generator), headers={"Connection": "close"}, timeout=30)
            assert answer.status_code == 200, answer.text
            worker = (url, int(answer.headers["X-Worker-Pid"]))
            if answer.headers["X-Model-Version"] == "2" and worker in pending:
                pending.discard(worker)
                reached[worker] = time.monotonic() - moved
        assert time.monotonic() - moved < 1 + 15 + 0.2, (pending, reached)
    print(
        f"\nthe alias move reached every worker of both instances in {max(reached.values()):.2f} s "
        f"(per worker: {', '.join(f'{s:.2f}' for s in sorted(reached.values()))})"
    )
