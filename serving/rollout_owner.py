"""Reports and decisions of a running rollout, from the machine's polling worker after each alias poll.

Every `ROLLOUT_REPORT_SECONDS`, each instance writes its counts (every worker's, merged by Prometheus's
multiprocess files) to the rollout's MLflow run, as the tag `report.<instance>`. One instance owns the
decisions: it holds the lease (the run's tag `rollout.owner`, renewed with each report), and another takes
it over once it is `ROLLOUT_LEASE_SECONDS` old. The owner sums the latest report of every instance (a
restarted instance reports under a new name; its old counts still count), subtracts the totals at the start
of the step (`rollout.baseline.<step>`), asks `rollout_decisions.decide`, and acts: the next step, a
promotion, a rollback, or the state `passed`/`held`. The decision and the step's figures go to the run.

With MLflow unreachable nothing is reported or decided (the poll before failed too), and routing goes on at
the percent the machine last read. What GET /rollout shows of all this is written to
`<state dir>/rollout-status.json` after each report.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from kernel.registry import AliasState, ModelNotFound, Registry, RegistryUnavailable
from kernel.rollout_spec import RolloutSpec
from serving import rollout_decisions, rollout_metrics

log = logging.getLogger(__name__)

OWNER_TAG = "rollout.owner"
DECISION_TAG = "rollout.decision"
REPORT_PREFIX = "report."
BASELINE_PREFIX = "rollout.baseline."
STATUS_FILE = "rollout-status.json"


def instance_name() -> str:
    """This instance's name in the reports: the host, gunicorn's master (or this process) and a random part,
    so that a restarted instance reports apart from its earlier life."""
    global _INSTANCE
    if _INSTANCE is None:
        master = os.getppid() if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else os.getpid()
        folder = os.path.basename(os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")) or uuid.uuid4().hex[:8]
        _INSTANCE = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{socket.gethostname()}-{master}-{folder}")[:120]
    return _INSTANCE


_INSTANCE: str | None = None


class RolloutOwner:
    """`tick(alias)` after each poll: report, keep or take the lease, decide, act (never raises)."""

    def __init__(self, registry: Registry, state_dir: Path, report_seconds: float, lease_seconds: float,
                 instance: Callable[[], str] = instance_name, clock: Callable[[], float] = time.time):  # fmt: skip
        self.registry = registry
        self.status_path = Path(state_dir) / STATUS_FILE
        self.report_seconds = report_seconds
        self.lease_seconds = lease_seconds
        self.instance = instance
        self.clock = clock
        self._next = 0.0

    def tick(self, alias: AliasState) -> bool:
        """Report, and decide while owning the lease; True if a decision moved the rollout (a step, an end, a
        state), so that the poll that ran it reads the new spec at once."""
        spec = alias.rollout
        if spec is None or not spec.run_id or self.clock() < self._next:
            return False
        self._next = self.clock() + self.report_seconds
        try:
            return self._tick(spec)
        except (RegistryUnavailable, ModelNotFound) as exc:  # MLflow is down, or the rollout ended meanwhile
            log.warning("rollout %s: no report or decision this time: %s", spec.id, exc)
        except Exception:
            log.exception("rollout %s: the report or decision failed", spec.id)
        return False

    def _tick(self, spec: RolloutSpec) -> bool:
        now, me = self.clock(), self.instance()
        mine = rollout_metrics.counts(spec.id)
        tags = self.registry.rollout_run_tags(spec)
        reports = {key[len(REPORT_PREFIX):]: _loads(value) for key, value in tags.items()
                   if key.startswith(REPORT_PREFIX)}  # fmt: skip
        reports[me] = {"at": now, "counts": mine}
        owner = _loads(tags.get(OWNER_TAG))
        owns = not owner or owner.get("instance") == me or now - owner.get("at", 0) > self.lease_seconds
        writes = {REPORT_PREFIX + me: json.dumps(reports[me], separators=(",", ":"))}
        decision = _loads(tags.get(DECISION_TAG))
        metrics = None
        total = rollout_decisions.merge(report["counts"] for report in reports.values() if "counts" in report)
        if owns:
            if owner and owner.get("instance") != me:
                log.warning("rollout %s: %s takes over the decisions from %s (its lease is %.0f s old)",
                            spec.id, me, owner.get("instance"), now - owner.get("at", 0))  # fmt: skip
            owner = {"instance": me, "at": now}
            writes[OWNER_TAG] = json.dumps(owner)
            baseline = _loads(tags.get(f"{BASELINE_PREFIX}{spec.step}")) or None
            chosen = rollout_decisions.decide(spec, total, rollout_decisions.minus(total, baseline), now)
            decision = {"action": chosen.action, "reason": chosen.reason, "at": now, "step": spec.step, "by": me}
            writes[DECISION_TAG] = json.dumps(decision)
            metrics = chosen.metrics
            if chosen.action == "step":
                writes[f"{BASELINE_PREFIX}{spec.step + 1}"] = json.dumps(total, separators=(",", ":"))
        self.registry.log_rollout(spec, writes, metrics)
        moved = owns and self._act(spec, decision["action"], decision["reason"], now)
        self._write_status(spec, reports, total, owner, decision, now, me)
        return moved

    def _act(self, spec: RolloutSpec, action: str, reason: str, now: float) -> bool:
        if action == "wait":
            return False
        log.warning("rollout %s: %s (%s)", spec.id, action, reason)
        if action == "step":
            self.registry.save_rollout(spec.next_step(now))
        elif action in ("promote", "rollback"):
            self.registry.end_rollout(spec, "promoted" if action == "promote" else "rolled_back", reason)
        else:  # pass, hold
            self.registry.mark_rollout(spec.with_state("passed" if action == "pass" else "held", reason))
        return True

    def _write_status(self, spec: RolloutSpec, reports: dict, total: dict, owner: dict, decision: dict | None,
                      now: float, me: str):  # fmt: skip
        reporting = sorted(name for name, report in reports.items() if now - report.get("at", 0) <= self.lease_seconds)
        status = {"rollout": spec.id, "at": now, "owner": owner, "instances_reporting": reporting,
                  "instances_reported": len(reports), "decision": decision, "merged": total,
                  "instance": me, "mine": reports[me]["counts"]}  # fmt: skip
        staging = self.status_path.with_suffix(f".{os.getpid()}.tmp")
        try:
            staging.write_text(json.dumps(status))
            os.replace(staging, self.status_path)
        except OSError as exc:  # a full or read-only disk: GET /rollout shows this instance's counts only
            log.warning("cannot write %s: %s", self.status_path, exc)


def read_status(state_dir: Path, rollout: str) -> dict | None:
    """The last status the machine's polling worker wrote for this rollout (by this instance), or None."""
    try:
        status = json.loads((Path(state_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return status if status.get("rollout") == rollout and status.get("instance") == instance_name() else None


def merged_now(status: dict | None, own: dict) -> dict:
    """Every instance's counts: the other instances' latest reports, and this instance's counts now."""
    if status is None:
        return rollout_decisions.merge([own])
    return rollout_decisions.merge([rollout_decisions.minus(status["merged"], status["mine"]), own])


def _loads(text: str | None) -> dict:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
