"""The keeper of Celery jobs (TRAIN_EXECUTOR=celery): a job whose attempt is lost, or that never reached the broker,
is sent again within a minute, not after the broker's visibility timeout.

A worker machine that dies takes its job's message with it until the broker's visibility timeout (the hard time
limit plus 30 s: 690 s at the default TRAIN_TIME_LIMIT_SECONDS) hands it to another worker. The job's own record
knows much sooner: its attempt writes a heartbeat every few seconds, and one not heard from for LEASE_SECONDS is
lost. Every `make worker` runs a keeper process beside its pool (`start_keeper`), which every KEEP_SECONDS sends
again the jobs of its own queue (`job.queue`; never another queue's, nor a local executor's):
- a running job whose attempt was not heard from for LEASE_SECONDS, once per silent attempt (`job.resent_for`),
  and again if that attempt is still the job's RESEND_AFTER_SECONDS later (the message sent again was lost too);
- a queued job that was never sent (the API died between recording it and sending it: no `job.sent_at`), once,
  when it is QUEUED_GRACE_SECONDS old.
The delivery that takes it records the lost attempt and runs the next one, or fails the job once TRAIN_MAX_ATTEMPTS
were used; when the broker later redelivers the original message, that delivery finds the job taken or finished
and does nothing (`execute_job` is fenced by the attempt id). Two keepers that send the same job at once make two
deliveries, which the same fence settles. The visibility timeout stays the last resort.

A heartbeat is a thread of the attempt's process: it also stops in a process frozen, or stuck in C code that holds
the GIL, for the lease. Such an attempt is handed to another worker like a lost one (the lease is 30 s, the hard
time limit 660 s at the defaults); the stuck process is killed at the hard limit, and that kill no longer writes
the job, which the new attempt owns (`JobRecord.time_limit`'s fence). An attempt stuck in C code that releases the
GIL keeps beating, and is failed at the hard limit.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from kernel.config import Settings
from kernel.registry import RegistryUnavailable, registry_from_settings
from training.attempt import LEASE_SECONDS
from training.job_record import JobRecord, JobState, JobStatus

log = logging.getLogger(__name__)

KEEP_SECONDS = 10.0
RESEND_AFTER_SECONDS = 5 * LEASE_SECONDS


def why_send_again(state: JobState, now: float) -> str | None:
    """Why this job must be sent again now, or None (`now` by this machine's clock)."""
    if state.status == JobStatus.RUNNING:
        age = state.heartbeat_age(now)
        if age is None or age <= LEASE_SECONDS:
            return None
        if state.resent_for == state.attempt and now - (state.resent_at or 0) < RESEND_AFTER_SECONDS:
            return None  # already sent again for this silent attempt
        return f"attempt {state.attempt} on {state.worker or 'a worker'} not heard from for {age:.0f} s"
    if state.never_sent(now):
        return f"queued {now - state.created:.0f} s ago and never sent"
    return None


def keep(registry, queue: str, send: Callable[[str], None], now: float | None = None) -> list[str]:
    """Send again every job of `queue` that needs it (see the module); returns their ids."""
    now = time.time() if now is None else now
    sent = []
    for state in JobRecord.unfinished(registry):
        why = why_send_again(state, now) if state.queue == queue else None
        if why is None:
            continue
        log.warning("training job %s: %s; sending it again", state.job_id, why)
        send(state.job_id)
        JobRecord(registry, state.job_id).sent(again_for=state.attempt)
        sent.append(state.job_id)
    return sent


def keep_forever(settings: Settings, parent: int) -> None:
    """Keep every KEEP_SECONDS until `parent` (the worker) is gone."""
    from training.celery_executor import CeleryExecutor, fresh_connections

    fresh_connections()  # the worker's MLflow connections stay the worker's
    registry, executor = registry_from_settings(settings), CeleryExecutor(settings)
    log.info("job keeper: sending again the lost jobs of queue %s (process %d)", settings.TRAIN_QUEUE, os.getpid())
    while os.getppid() == parent:
        try:
            keep(registry, settings.TRAIN_QUEUE, executor.send)
        except RegistryUnavailable as exc:
            log.warning("the job keeper cannot read the jobs now: %s", exc)
        except Exception:  # the keeper must outlive any one failure
            log.exception("keeping training jobs failed")
        deadline = time.monotonic() + KEEP_SECONDS
        while time.monotonic() < deadline and os.getppid() == parent:
            time.sleep(1.0)


def start_keeper(settings: Settings) -> int:
    """Fork the keeper from the worker's process, before its warm-up, its pool and any thread; returns its pid.
    It ends when the worker does (it checks every second)."""
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    try:
        keep_forever(settings, parent)
    except BaseException:
        log.exception("the job keeper stopped")
    finally:
        os._exit(0)
