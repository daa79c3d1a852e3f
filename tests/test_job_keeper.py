"""Which jobs are sent again: by the Celery workers' keeper (training/job_keeper.py; its drills are in
test_celery.py), and a local job the API never started, by the local executor's sweeper."""

from __future__ import annotations

import time

from service import create_app
from tests.conftest import client_of, mlflow_client
from tests.training_helpers import wait_done
from training.attempt import LEASE_SECONDS
from training.job_keeper import RESEND_AFTER_SECONDS, keep, why_send_again
from training.job_record import QUEUED_GRACE_SECONDS, JobState, JobStatus

NOW = 1_800_000_000.0


def state(status: JobStatus, **times) -> JobState:
    return JobState(job_id="a" * 32, status=status, request={}, dataset={}, created_at_ms=int((NOW - 3600) * 1000),
                    **{"created_at": NOW - 3600, "attempt": 1, "worker": "w0@host", "queue": "training", **times})  # fmt: skip


def test_a_running_job_is_sent_again_once_its_attempt_is_silent_past_the_lease():
    assert why_send_again(state(JobStatus.RUNNING, started_at=NOW - 100, heartbeat_at=NOW - 5), NOW) is None
    silent = state(JobStatus.RUNNING, started_at=NOW - 100, heartbeat_at=NOW - LEASE_SECONDS - 1)
    assert "attempt 1 on w0@host not heard from for 31 s" == why_send_again(silent, NOW)
    # once per silent attempt: a keeper already sent it again for attempt 1
    resent = state(JobStatus.RUNNING, started_at=NOW - 100, heartbeat_at=NOW - 40, resent_at=NOW - 20, resent_for=1)
    assert why_send_again(resent, NOW) is None
    # ... unless attempt 1 is still the job's long after: that message was lost too
    lost_again = state(JobStatus.RUNNING, heartbeat_at=NOW - 400, resent_at=NOW - RESEND_AFTER_SECONDS - 1,
                       resent_for=1)  # fmt: skip
    assert why_send_again(lost_again, NOW) is not None
    # a later attempt that is silent too is sent again (the earlier resend was for attempt 1)
    again = state(JobStatus.RUNNING, attempt=2, heartbeat_at=NOW - 35, resent_at=NOW - 20, resent_for=1)
    assert why_send_again(again, NOW) is not None


def test_a_queued_job_is_sent_again_only_if_it_was_never_sent_and_past_the_grace():
    never_sent = state(JobStatus.QUEUED, created_at=NOW - QUEUED_GRACE_SECONDS - 1)
    assert "never sent" in why_send_again(never_sent, NOW)
    assert why_send_again(state(JobStatus.QUEUED, created_at=NOW - 10), NOW) is None  # the API may be sending it
    waiting = state(JobStatus.QUEUED, created_at=NOW - 3000, sent_at=NOW - 3000)  # in the broker, behind others
    assert why_send_again(waiting, NOW) is None
    assert (
        why_send_again(state(JobStatus.QUEUED, created_at=NOW - 3000, resent_at=NOW - 100, resent_for=0), NOW) is None
    )
    for finished in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        assert why_send_again(state(finished, heartbeat_at=NOW - 3000), NOW) is None


class FakeRegistry:
    """The registry calls `keep` makes: one search per run status, and the tags it writes."""

    def __init__(self, runs):
        self.runs, self.tags = runs, {}

    def search_runs(self, filter_string, max_results):
        return [run for run in self.runs if f"'{run.info.status}'" in filter_string]

    def set_run_tags(self, run_id, tags):
        self.tags.setdefault(run_id, {}).update(tags)


def test_keep_sends_each_job_that_needs_it_and_records_that_it_did():
    from types import SimpleNamespace

    def run(run_id, status, tags):
        tags = {"job.created_at": repr(NOW - 3600), "job.queue": "training", **tags}
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id, status=status, start_time=0),
                               data=SimpleNamespace(tags=tags, metrics={}))  # fmt: skip

    lost = run("1" * 32, "RUNNING", {"job.status": "running", "job.attempt": "1", "job.heartbeat_at": repr(NOW - 99)})
    alive = run("2" * 32, "RUNNING", {"job.status": "running", "job.attempt": "1", "job.heartbeat_at": repr(NOW - 1)})
    unsent = run("3" * 32, "SCHEDULED", {"job.status": "queued"})
    waiting = run("4" * 32, "SCHEDULED", {"job.status": "queued", "job.sent_at": repr(NOW - 3000)})
    other_queue = run("6" * 32, "SCHEDULED", {"job.status": "queued", "job.queue": "training-gpu"})
    local = run(
        "7" * 32, "RUNNING", {"job.status": "running", "job.queue": "local", "job.heartbeat_at": repr(NOW - 99)}
    )
    untagged = run("8" * 32, "SCHEDULED", {"job.status": "queued", "job.queue": ""})  # a job older than the tag
    registry, sent = FakeRegistry([lost, alive, unsent, waiting, other_queue, local, untagged]), []
    assert sorted(keep(registry, "training", sent.append, NOW)) == ["1" * 32, "3" * 32] == sorted(sent)
    assert registry.tags["1" * 32]["job.resent_for"] == "1" and registry.tags["3" * 32]["job.resent_for"] == "0"
    assert all("job.resent_at" in tags for tags in registry.tags.values())


def test_a_hard_kill_is_recorded_only_while_the_killed_process_still_runs_the_job():
    """An attempt silent past the lease may have been taken over before the hard limit killed it: its supervisor
    must not fail the job the new attempt is running."""
    from types import SimpleNamespace

    from training.job_record import JobRecord

    class Registry(FakeRegistry):
        def get_run(self, run_id):
            tags = {"job.status": "running", "job.attempt": "2", "job.worker": "w1@b:4242", **self.tags.get(run_id, {})}
            return SimpleNamespace(info=SimpleNamespace(run_id=run_id, status="RUNNING", start_time=0),
                                   data=SimpleNamespace(tags=tags, metrics={}))  # fmt: skip

    registry = Registry([])
    JobRecord(registry, "5" * 32).time_limit(600, worker="w0@a:4242")  # the first attempt, another host, same pid
    assert registry.tags == {}
    registry.search_model_versions_of_run = lambda run_id: []
    registry.end_run = lambda run_id, status: registry.tags[run_id].update({"ended": status})
    JobRecord(registry, "5" * 32).time_limit(600, worker="w1@b:4242")  # the running attempt's own process
    assert registry.tags["5" * 32]["job.status"] == "failed" and registry.tags["5" * 32]["ended"] == "FAILED"


def test_a_local_job_the_api_never_started_runs_once_after_the_grace(store, app_config):
    """The API recorded the job and stopped before it started its process: a sweeper starts it once it is
    QUEUED_GRACE_SECONDS old (the clock is moved on, not waited for), and once only."""
    from training.spec import TrainingSpec
    from training.submitter import create_job

    app = create_app({**app_config, "TRAIN_MAX_ATTEMPTS": 1})
    executor, client = app.extensions["train_executor"], client_of(app)
    spec = TrainingSpec("DecisionTreeClassifier", {}, activate=False, model_name="never-started")
    job_id = create_job(store["registry"], spec, "iris", max_queued=100, queue="local")
    now = time.time()
    assert executor.recover_unsent(now) == []  # within the grace: the API may still be starting it
    assert client.get(f"/train/jobs/{job_id}").json["status"] == "queued"
    later = now + QUEUED_GRACE_SECONDS + 1
    assert executor.recover_unsent(later) == [job_id]
    assert executor.recover_unsent(later) == []  # started once: its record says so
    job = wait_done(client, f"/train/jobs/{job_id}")
    assert job["status"] == "succeeded" and job["attempt"] == 1, job
    assert executor.recover_unsent(later + 3600) == []
    assert len(mlflow_client(store["uri"]).search_model_versions(f"run_id = '{job_id}'")) == 1
