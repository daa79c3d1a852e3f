"""The MLflow-backed registry: log, list, download and activate model versions.

A thin layer over `MlflowClient` with the same verb_noun names. It never reads Flask's config: the
app factory builds one with the settings. MLflow's own errors become `ModelNotFound` (the name,
version or alias does not exist) or `RegistryUnavailable` (the tracking server cannot be reached).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import DatasetInput, Run, RunTag
from mlflow.exceptions import MlflowException

from kernel.config import Settings, artifact_location, check_tracking_uri, sqlite_path
from kernel.locks import file_lock
from kernel.model_format import runtime_of
from kernel.refs import ModelRef
from kernel.registry_errors import ModelNotFound, RegistryError, RegistryUnavailable, translate_errors
from kernel.rollout_registry import RolloutRecords
from kernel.rollout_spec import ROLLOUT_TAG, AliasState, RolloutSpec

__all__ = ["AliasState", "ModelNotFound", "ModelRef", "Registry", "RegistryError", "RegistryUnavailable"]

log = logging.getLogger(__name__)


def _json_or_empty(text: str | None) -> dict:
    """A JSON object from a tag, or {} when the tag is missing or was written by something else."""
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def iso_time(timestamp_ms: int | None) -> str | None:
    """An MLflow timestamp (milliseconds) as ISO 8601 in UTC ("2026-12-02T15:12:16.123000Z"), or None."""
    if timestamp_ms is None:
        return None
    return datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC).isoformat().replace("+00:00", "Z")


class Registry(RolloutRecords):
    """One tracking server's registry, seen through one experiment that holds the service's runs."""

    def __init__(
        self, tracking_uri: str, experiment_name: str, alias: str = "active", rollout_alias: str = "candidate"
    ):
        check_tracking_uri(tracking_uri)
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.alias = alias
        self.rollout_alias = rollout_alias
        database = sqlite_path(tracking_uri)
        if database:
            # Creating the client creates a new database's tables; two workers doing it at once
            # break MLflow's migrations, so the workers of a machine take turns.
            with file_lock(database.parent / ".mlflow-init.lock"):
                self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        else:
            self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self._experiment_id: str | None = None

    @translate_errors
    def get_experiment_id(self) -> str:
        """The service's experiment, created on first use (its artifacts beside a local database)."""
        if self._experiment_id is None:
            experiment = self.client.get_experiment_by_name(self.experiment_name)
            if experiment is None:
                location = artifact_location(self.tracking_uri)
                if location:
                    Path(location.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
                try:
                    self._experiment_id = self.client.create_experiment(
                        self.experiment_name, artifact_location=location
                    )
                except MlflowException:  # another worker created it first
                    experiment = self.client.get_experiment_by_name(self.experiment_name)
                    if experiment is None:
                        raise
                    self._experiment_id = experiment.experiment_id
            else:
                self._experiment_id = experiment.experiment_id
        return self._experiment_id

    @translate_errors
    def search_model_versions(self) -> list:
        """Every version of every registered model, all pages."""
        versions, token = [], None
        while True:
            page = self.client.search_model_versions(max_results=1000, page_token=token)
            versions.extend(page)
            token = page.token
            if not token:
                return versions

    def list_models(self, serving_runtime: str = "auto") -> list[dict]:
        """What `/models` answers: one entry per version, newest first, with its tags and aliases.

        `serving_runtime` is SERVING_RUNTIME ("sklearn" overrides the versions' compiled forms).
        """
        aliases = self.search_aliases()
        entries = []
        for mv in self.search_model_versions():
            tags = mv.tags or {}
            entries.append(
                {
                    "name": mv.name,
                    "version": str(mv.version),
                    "created_at": iso_time(mv.creation_timestamp),
                    "estimator": tags.get("estimator"),
                    "dataset": tags.get("dataset"),
                    "metrics": _json_or_empty(tags.get("metrics")),
                    "run_id": mv.run_id,
                    "aliases": sorted(aliases.get((mv.name, str(mv.version)), [])),
                    "active": self.alias in aliases.get((mv.name, str(mv.version)), []),
                    **runtime_of(tags, serving_runtime),
                }
            )
        entries.sort(key=lambda e: (e["created_at"] or "", e["name"], int(e["version"])), reverse=True)
        return entries

    def search_aliases(self) -> dict[tuple[str, str], list[str]]:
        """Aliases by (name, version): version searches do not return them, registered models do."""
        return self._search_registered_models()[0]

    @translate_errors
    def _search_registered_models(self) -> tuple[dict[tuple[str, str], list[str]], int, list[RolloutSpec]]:
        """Aliases by (name, version), how many models are registered, and the rollout specs their tags hold:
        one search, all pages."""
        aliases: dict[tuple[str, str], list[str]] = {}
        token, models, rollouts = None, 0, []
        while True:
            page = self.client.search_registered_models(max_results=1000, page_token=token)
            for model in page:
                models += 1
                for alias, version in (model.aliases or {}).items():
                    aliases.setdefault((model.name, str(version)), []).append(alias)
                spec = RolloutSpec.from_json((model.tags or {}).get(ROLLOUT_TAG) or "")
                if spec is not None and spec.candidate.name == model.name:
                    rollouts.append(spec)
            token = page.token
            if not token:
                return aliases, models, rollouts

    @translate_errors
    def get_model_version(self, name: str, version: str) -> ModelRef:
        """The version if it is registered; ModelNotFound otherwise."""
        mv = self.client.get_model_version(name, str(version))
        return ModelRef(mv.name, str(mv.version))

    @translate_errors
    def get_version_metrics(self, name: str, version: str) -> dict:
        """The version's hold-out metrics from training (its `metrics` tag); ModelNotFound if not registered."""
        return _json_or_empty((self.client.get_model_version(name, str(version)).tags or {}).get("metrics"))

    @translate_errors
    def version_run(self, name: str, version: str) -> Run:
        """The run that registered the version (its training job's); ModelNotFound if not registered."""
        return self.client.get_run(self.client.get_model_version(name, str(version)).run_id)

    @translate_errors
    def log_live_metrics(self, name: str, version: str, figures: dict[str, float], when: float) -> None:
        """Live figures (`live_accuracy`, ...) as metrics on the version's training run, the time (seconds) as the
        step: the MLflow UI charts them beside the run's offline metrics."""
        from mlflow.entities import Metric

        run_id = self.client.get_model_version(name, str(version)).run_id
        metrics = [Metric(key, float(value), int(when * 1000), int(when)) for key, value in figures.items()]
        self.client.log_batch(run_id, metrics=metrics)

    @translate_errors
    def get_model_version_by_alias(self, name: str, alias: str) -> ModelRef:
        """The version an alias points to; ModelNotFound if the model or alias does not exist."""
        mv = self.client.get_model_version_by_alias(name, alias)
        return ModelRef(mv.name, str(mv.version))

    @translate_errors
    def download_model_version(self, ref: ModelRef, destination: Path) -> Path:
        """Fetch the version's files (MLmodel, model.skops, signature, input example) to a folder."""
        import mlflow.artifacts

        destination.mkdir(parents=True, exist_ok=True)
        # Resolved through this client, not a models:/ URI, which MLflow resolves with its global registry.
        source = self.client.get_model_version_download_uri(ref.name, ref.version)
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=str(destination), tracking_uri=self.tracking_uri
        )
        return Path(path)

    def read_alias_state(self) -> AliasState:
        """Which versions carry the active alias: one search of the registered models (all pages), no more."""
        aliases, models, rollouts = self._search_registered_models()
        holders = [ModelRef(name, version) for (name, version), names in aliases.items() if self.alias in names]
        running, overridden = None, []
        for spec in rollouts:  # in force while both aliases are where the rollout put them
            candidate = self.rollout_alias in aliases.get((spec.candidate.name, spec.candidate.version), [])
            if candidate and holders == [spec.stable] and running is None:
                running = spec
            else:
                overridden.append(spec)
        ordered = tuple(sorted(holders, key=lambda ref: (ref.name, int(ref.version))))
        return AliasState(ordered, models, running, tuple(overridden))

    def get_active_model(self) -> ModelRef | None:
        """The version the active alias is on; None when no model carries it, or more than one does."""
        return self.read_alias_state().active

    @translate_errors
    def set_active_model(self, ref: ModelRef) -> None:
        """Move the active alias onto `ref`, and nothing else: it leaves any other model that carried it.

        If that fails, the alias goes back where it was (a conflict is left only if MLflow stops answering
        in between, and the service reports it)."""
        previous = self.read_alias_state().holders
        self.client.set_registered_model_alias(ref.name, self.alias, ref.version)
        try:
            for other in previous:
                if other.name != ref.name:
                    self.client.delete_registered_model_alias(other.name, self.alias)
        except Exception:
            self._move_alias_back(ref, previous)
            raise

    def _move_alias_back(self, ref: ModelRef, previous: tuple[ModelRef, ...]) -> None:
        try:
            if not any(other.name == ref.name for other in previous):
                self.client.delete_registered_model_alias(ref.name, self.alias)
            for other in previous:
                self.client.set_registered_model_alias(other.name, self.alias, other.version)
        except Exception:
            log.warning("could not restore alias %r after a failed move", self.alias)

    @translate_errors
    def delete_model_version(self, ref: ModelRef) -> None:
        """Remove a version (a job that failed after registering must leave nothing behind)."""
        self.client.delete_model_version(ref.name, ref.version)

    # ---- runs and their tags: what training jobs use (a job is a run of the service's experiment) ----------
    # Here so that no raw MLflow client leaves the registry; each answers MLflow's errors as the registry's own.
    @translate_errors
    def create_run(self, tags: dict[str, str], run_name: str) -> Run:
        """A new run in the service's experiment, with its tags (MLflow starts it RUNNING)."""
        return self.client.create_run(self.get_experiment_id(), tags=tags, run_name=run_name)

    @translate_errors
    def get_run(self, run_id: str) -> Run:
        """The run: its info, tags and metrics; ModelNotFound if there is no such run."""
        return self.client.get_run(run_id)

    @translate_errors
    def search_runs(self, filter_string: str, max_results: int) -> list[Run]:
        """Runs of the service's experiment that match `filter_string` (MLflow's search syntax), one page."""
        return list(self.client.search_runs([self.get_experiment_id()], filter_string, max_results=max_results))

    @translate_errors
    def set_run_tags(self, run_id: str, tags: dict[str, str]) -> None:
        """Write the tags in one batch."""
        self.client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])

    @translate_errors
    def set_run_status(self, run_id: str, status: str) -> None:
        """Set the run's MLflow status ("SCHEDULED", "RUNNING") as the UI shows it."""
        self.client.update_run(run_id, status=status)

    @translate_errors
    def end_run(self, run_id: str, status: str) -> None:
        """End the run with a final MLflow status ("FINISHED", "FAILED"), recording its end time."""
        self.client.set_terminated(run_id, status)

    @translate_errors
    def delete_run(self, run_id: str) -> None:
        """Delete the run (it moves to MLflow's deleted lifecycle stage)."""
        self.client.delete_run(run_id)

    @translate_errors
    def log_run_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """Store `text` as the run's artifact `artifact_file`."""
        self.client.log_text(run_id, text, artifact_file)

    @translate_errors
    def load_run_text(self, run_id: str, artifact_file: str) -> str:
        """The text of the run's artifact `artifact_file`."""
        with tempfile.TemporaryDirectory() as folder:
            return Path(self.client.download_artifacts(run_id, artifact_file, folder)).read_text()

    @translate_errors
    def log_run_inputs(self, run_id: str, datasets: list[DatasetInput]) -> None:
        """Record datasets as the run's inputs (the MLflow UI shows their name, digest and schema)."""
        self.client.log_inputs(run_id, datasets=datasets)

    @translate_errors
    def search_model_versions_of_run(self, run_id: str) -> set[ModelRef]:
        """The versions registered from the run."""
        return {ModelRef(mv.name, str(mv.version)) for mv in self.client.search_model_versions(f"run_id = '{run_id}'")}


def registry_from_settings(settings: Settings) -> Registry:
    """The registry the settings name, with MLflow's client bounded by them (app, job and CLI alike)."""
    mlflow_client_settings(settings.MLFLOW_HTTP_REQUEST_TIMEOUT, settings.MLFLOW_HTTP_REQUEST_MAX_RETRIES)
    return Registry(settings.MLFLOW_TRACKING_URI, settings.MLFLOW_EXPERIMENT_NAME, settings.ACTIVE_ALIAS,
                    settings.ROLLOUT_ALIAS)  # fmt: skip


def mlflow_client_settings(timeout: int, max_retries: int) -> None:
    """Bound MLflow's HTTP client so a dead tracking server cannot hold a worker past its timeout."""
    # MLflow reads these from the environment on each call; the config already took the user's values.
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(timeout)
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(max_retries)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0.5")
    # No usage telemetry leaves the service, and no progress bars clutter its log.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
