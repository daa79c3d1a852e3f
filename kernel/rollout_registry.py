"""The registry's side of rollouts: where a rollout lives in MLflow, and how it starts, steps and ends there.

A mixin of `Registry` (kernel/registry.py), kept apart so that each stays one job: it uses the registry's
client and alias names, and answers MLflow's errors as the registry's own.
"""

from __future__ import annotations

import time

from mlflow.entities import Metric, RunTag

from kernel.registry_errors import ModelNotFound, translate_errors
from kernel.rollout_spec import REASON_TAG, ROLLOUT_TAG, STATE_TAG, RolloutSpec


class RolloutRecords:
    """Start, step and end a rollout in MLflow (needs `client`, `alias`, `rollout_alias` and the run methods)."""

    @translate_errors
    def start_rollout(self, spec: RolloutSpec) -> RolloutSpec:
        """Record the rollout: its run (the spec as parameters), the rollout alias on the candidate, then the spec
        on the candidate's model (written last: a spec is in force only once its aliases are in place)."""
        run = self.create_run({"rollout.id": spec.id, "rollout.mode": spec.mode}, run_name=f"rollout-{spec.id}")
        params = {key: str(value)[:500] for key, value in spec.as_dict().items() if key not in ("run_id", "step")}
        for key, value in params.items():
            self.client.log_param(run.info.run_id, key, value)
        spec = RolloutSpec.from_dict({**spec.as_dict(), "run_id": run.info.run_id})
        self.client.set_registered_model_alias(spec.candidate.name, self.rollout_alias, spec.candidate.version)
        self.client.set_model_version_tag(spec.candidate.name, spec.candidate.version, REASON_TAG, "started")
        self.client.set_model_version_tag(spec.candidate.name, spec.candidate.version, STATE_TAG, "running")
        self.client.set_registered_model_tag(spec.candidate.name, ROLLOUT_TAG, spec.to_json())
        return spec

    @translate_errors
    def save_rollout(self, spec: RolloutSpec) -> None:
        """Rewrite the spec (a new step): every instance reads it in its next poll."""
        self.client.set_registered_model_tag(spec.candidate.name, ROLLOUT_TAG, spec.to_json())
        if spec.run_id:
            self.client.log_metric(spec.run_id, "percent", spec.percent, int(time.time() * 1000), spec.step)

    @translate_errors
    def rollout_run_tags(self, spec: RolloutSpec) -> dict[str, str]:
        """The tags of the rollout's run: the instances' reports, the owner's lease, the baselines, the decision."""
        return dict(self.client.get_run(spec.run_id).data.tags) if spec.run_id else {}

    @translate_errors
    def log_rollout(self, spec: RolloutSpec, tags: dict[str, str], metrics: dict[str, float] | None = None) -> None:
        """Write tags (and the current step's metrics) to the rollout's run, in one call."""
        if not spec.run_id:
            return
        now = int(time.time() * 1000)
        self.client.log_batch(
            spec.run_id,
            metrics=[Metric(key, float(value), now, spec.step) for key, value in (metrics or {}).items()],
            tags=[RunTag(key, value[:8000]) for key, value in tags.items()],  # MLflow's limit
        )

    @translate_errors
    def mark_rollout(self, spec: RolloutSpec) -> None:
        """Rewrite the spec in a new state (`passed`, `held`), and say so on the candidate version."""
        ref = spec.candidate
        self.client.set_model_version_tag(ref.name, ref.version, REASON_TAG, spec.reason[:5000])
        self.client.set_model_version_tag(ref.name, ref.version, STATE_TAG, spec.state)  # last: the reason is there
        self.save_rollout(spec)

    @translate_errors
    def end_rollout(self, spec: RolloutSpec, state: str, reason: str) -> None:
        """End the rollout as `state`: the spec goes first (the rollout is no longer in force), then `promoted`
        moves the active alias onto the candidate, the rollout alias goes, and the candidate version and the
        rollout's run keep the outcome and its reason.

        The spec goes before the alias moves: an instance that read the moved alias beside a spec still in
        force would take the promotion for a move by hand and end the rollout as `overridden`."""
        self.client.delete_registered_model_tag(spec.candidate.name, ROLLOUT_TAG)
        if state == "promoted":
            self.set_active_model(spec.candidate)
        try:
            holder = self.client.get_model_version_by_alias(spec.candidate.name, self.rollout_alias)
            if str(holder.version) == spec.candidate.version:
                self.client.delete_registered_model_alias(spec.candidate.name, self.rollout_alias)
        except ModelNotFound:
            pass
        except Exception as exc:  # MLflow's "alias not found" is an MlflowException
            if getattr(exc, "error_code", "") not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
        ref = spec.candidate
        try:
            self.client.set_model_version_tag(ref.name, ref.version, REASON_TAG, reason[:5000])
            self.client.set_model_version_tag(ref.name, ref.version, STATE_TAG, state)  # last: the reason is there
        except Exception as exc:  # the candidate version was deleted: its outcome stays in the run
            if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                raise
        if spec.run_id:
            self.client.set_tag(spec.run_id, REASON_TAG, reason[:5000])
            self.client.set_tag(spec.run_id, STATE_TAG, state)
            self.client.set_terminated(spec.run_id, "FINISHED")
