"""Configuration: one typed, validated settings object; defaults, then the environment, then a test's overrides.

Every setting is a field of `Settings` below, read from the environment variable of the same name;
its description is the documentation (the README's table is `kernel.settings_doc.settings_table()`). Adding one
is one line here. An invalid value stops the process with one line that names the setting.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlparse

from flask import current_app
from pydantic import BeforeValidator, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STORE = PROJECT_ROOT / ".mlflow"

TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")
TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "file", "databricks", "")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


class ConfigError(ValueError):
    """A setting has a value the service cannot run with; the message is one line naming it."""


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def _flag(value: object) -> object:
    """true/false, 1/0, yes/no, on/off (any case) and nothing else: `ture` is an error, not false."""
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise ValueError(f"not a boolean; use one of {'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)}")
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise ValueError("not a boolean")


def _comma_list(value: object) -> object:
    """A list of names from the environment: comma-separated (ALLOWED_HOSTS: '*' for any)."""
    if isinstance(value, str):
        return tuple(name.strip() for name in value.split(",") if name.strip())
    return value


Flag = Annotated[bool, BeforeValidator(_flag)]
NameList = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_comma_list)]
Count = Annotated[int, Field(ge=0)]
Positive = Annotated[int, Field(ge=1)]
Name = Annotated[str, Field(min_length=1)]
HostList = Annotated[tuple[str, ...] | None, NoDecode, BeforeValidator(_comma_list)]
LogLevel = Annotated[
    Literal["debug", "info", "warning", "error", "critical"], BeforeValidator(lambda v: str(v).strip().lower())
]


class Settings(BaseSettings):
    """Every setting of the service, each read from the environment variable of the same name."""

    model_config = SettingsConfigDict(case_sensitive=True, env_ignore_empty=True, extra="forbid", frozen=True)

    # One line per setting: NAME: type = Field(default, description=...). fmt: off keeps them one line each.
    # fmt: off
    # The service
    APP_ROLE: Literal["all", "inference", "training"] = Field("all", description="`all` (serves and trains), `inference` (never trains) or `training` (no `/predict`)")
    MLFLOW_TRACKING_URI: Name = Field(f"sqlite:///{DEFAULT_STORE / 'mlflow.db'}", description="the MLflow store; for a SQLite file, artifacts go to `artifacts/` beside it, so an empty folder is a complete, separate store")
    MLFLOW_EXPERIMENT_NAME: Name = Field("model-serving", description="the experiment holding the service's runs and its active-model pointer")
    DEFAULT_MODEL_NAME: Name = Field("iris-RandomForestClassifier", description="the model trained and served on a first start with an empty registry")
    ACTIVE_ALIAS: Name = Field("active", description="the MLflow alias that decides which version every instance serves (checked at start against MLflow's alias rules); move it with `/use-model`, the MLflow UI or any MLflow client")
    BOOTSTRAP_DEFAULT_MODEL: Flag = Field(True, description="train the default model on a first start with an empty registry (role `all` only)")
    STATE_DIR: str = Field("", description="this machine's model cache, active-model pointer, jobs and generated API token (default: `serving-state/` beside the SQLite file, or under the temp folder)")
    ROLLOUT_ALIAS: Name = Field("candidate", description="the MLflow alias a rollout puts on its candidate version (`POST /rollout`); moving it, or `ACTIVE_ALIAS`, by hand ends the rollout as `overridden`")
    ROLLOUT_REPORT_SECONDS: float = Field(5.0, gt=0, allow_inf_nan=False, description="how often each instance reports a running rollout's counts to the rollout's MLflow run (after a poll); the owner decides as often")
    ROLLOUT_LEASE_SECONDS: float = Field(30.0, gt=0, allow_inf_nan=False, description="the lease of the instance that owns a rollout's decisions: another takes them over once its last report is this old")
    SHADOW_QUEUE: Positive = Field(64, description="shadow requests each worker holds for the candidate to score; beyond it they are dropped and counted")
    SHADOW_INLINE_BUDGET_MS: float = Field(5.0, gt=0, allow_inf_nan=False, description="on Lambda the shadow scores within the request (no thread runs between answers): only while the candidate's median scoring time is under this; otherwise the request is skipped and counted as dropped")
    SHADOW_INLINE_SAMPLE: float = Field(0.1, gt=0, le=1, allow_inf_nan=False, description="on Lambda, the share of the shadowed requests the candidate scores within the request")
    SHADOW_MAX_ROWS: Positive = Field(1000, description="a batch larger than this is not shadowed (dropped and counted)")
    ACTIVE_POLL_SECONDS: float = Field(5.0, gt=0, allow_inf_nan=False, description="how often one worker per machine reads the alias from MLflow (one search); a move reaches every worker within this plus the load time plus 0.2 s")
    SERVING_CACHE_VERSIONS: Positive = Field(3, description="versions kept loaded per worker for `/models/<name>/versions/<v>/predict` and swaps (least recently used out first; the active version is never evicted)")
    WATCH_REGISTRY: Flag = Field(True, description="poll the registry, and start again local training jobs whose process died, in background threads (gunicorn.conf.py turns it off in a preloading master; each worker starts them)")
    START_MODEL_STORE: Flag = Field(True, description="load the active model at start (tests turn it off)")
    MLFLOW_HTTP_REQUEST_TIMEOUT: Positive = Field(5, description="seconds for one call to a tracking server")
    MLFLOW_HTTP_REQUEST_MAX_RETRIES: Count = Field(2, description="retries of a failed call to a tracking server")
    # Requests
    MAX_CONTENT_LENGTH: Positive = Field(6 * 1024 * 1024, description="request body limit in bytes, with Content-Length or chunked (over it: 413)")
    MAX_BATCH_ROWS: Positive = Field(50_000, description="rows per `/predict`")
    SERVING_RUNTIME: Literal["auto", "sklearn"] = Field("auto", description="`auto`: versions with a verified ONNX form are served by ONNX Runtime, the others by scikit-learn; `sklearn`: every version by scikit-learn")
    # Who may call
    API_TOKEN: SecretStr | None = Field(None, description="the token `/train`, `/train/jobs/*`, `/use-model`, `/rollout*` and `/feedback` require; when unset, one is generated into `STATE_DIR/api-token` (mode 0600) on first start and `make token` prints it")
    API_AUTH: Flag = Field(True, description="`off` opens `/train`, `/train/jobs/*` and `/use-model` to anyone who can reach the service (the log warns at every start)")
    FEEDBACK_TOKEN: SecretStr | None = Field(None, description="when set, `POST /feedback` also takes this token (a labelling team's), besides the management token; it opens nothing else")
    PREDICT_TOKEN: SecretStr | None = Field(None, description="when set, `/predict` and `/invocations` require it too")
    ALLOWED_HOSTS: HostList = Field(None, description="Host header names answered (any port), comma-separated, `*` for any; default: `localhost,127.0.0.1,[::1]` when `HOST` is a loopback address, any otherwise")
    # Training
    TRAIN_EXECUTOR: Literal["local", "celery"] = Field("local", description="`local`: jobs run on this machine in their own processes (no broker); `celery`: jobs go through `CELERY_BROKER_URL` to `make worker` machines and this one never trains")
    CELERY_BROKER_URL: str = Field("", description="the Celery broker for `TRAIN_EXECUTOR=celery`: `redis://host:6379/0` or `sqs://` (never logged: it may hold a password)")
    CELERY_BROKER_TRANSPORT_OPTIONS: str = Field("{}", description='the broker\'s transport options as a JSON object, e.g. `{"region": "eu-west-1"}` for SQS')
    TRAIN_QUEUE: Name = Field("training", description="the queue (Redis list or SQS queue name) training jobs go through")
    TRAIN_WORKER_CONCURRENCY: Positive = Field(1, description="jobs at once per worker (`make worker`), or on this machine with `TRAIN_EXECUTOR=local`")
    TRAIN_WARM_START: Flag = Field(True, description="`TRAIN_EXECUTOR=local`: each job's process forks from a warm parent that imported the training code once (about 440 MiB resident while the service runs, started with it); `false`: each job's process starts cold and imports for about 9 s")
    TRAIN_MAX_QUEUED: Positive = Field(20, description="jobs waiting for a worker; beyond it `/train` answers 429 with `Retry-After`")
    TRAIN_MAX_ATTEMPTS: Positive = Field(2, description="a job whose worker vanished runs again until this many attempts, then fails")
    TRAIN_TIME_LIMIT_SECONDS: Positive = Field(600, description="a job running longer is killed and marked failed")
    TRAIN_MAX_ROWS: Positive = Field(50_000, description="rows of client data (inline or CSV)")
    TRAIN_MAX_COLUMNS: Positive = Field(200, description="feature columns of client data (inline or CSV)")
    # Drift
    PREDICTION_LOG: Flag = Field(True, description="record every answered row (id, request id, time, version, route, runtime, label, probabilities, whether a value was outside the training range; the inputs only with `PREDICTION_LOG_INPUTS`) in the prediction log, for `POST /feedback` and live accuracy")
    PREDICTION_LOG_INPUTS: Flag = Field(False, description="also record each row's validated feature values (what `python -m serving.drift report` and retraining from labelled traffic need). Off by default: request bodies are never logged, and turning it on stores what clients send (personal data included) for `PREDICTION_LOG_RETENTION_DAYS`")
    PREDICTION_LOG_EXCLUDE: NameList = Field((), description="features never stored with `PREDICTION_LOG_INPUTS=true`, comma-separated (the rest of the row still is)")
    PREDICTION_LOG_URL: str = Field("", description="the prediction log's database as a SQLAlchemy URL (`postgresql+psycopg2://user@host/db`); empty: a SQLite file beside the embedded MLflow store, else in `STATE_DIR` (never logged: it may hold a password)")
    PREDICTION_LOG_SAMPLE: float = Field(1.0, ge=0, le=1, allow_inf_nan=False, description="the share of requests recorded (0 to 1); an answer not recorded says `prediction_logged: false`, and its ids take no feedback")
    PREDICTION_LOG_QUEUE: Positive = Field(50_000, description="rows each worker holds for the log's writer; beyond it rows are dropped and counted")
    PREDICTION_LOG_FLUSH_SECONDS: float = Field(1.0, gt=0, le=60, allow_inf_nan=False, description="how often each worker writes its queued rows (a SIGKILL loses at most this much)")
    PREDICTION_LOG_RETENTION_DAYS: Positive = Field(30, description="logged rows older than this are deleted, in small batches, by one process per machine (at most every 10 minutes)")
    PERFORMANCE_REFRESH_SECONDS: Positive = Field(60, description="how often one process per machine computes live accuracy per version from the log for `/metrics` (never per scrape)")
    PERFORMANCE_LOG_SECONDS: Positive = Field(300, description="how often that process also logs each version's `live_accuracy`, `live_f1_macro` and `labelled_rows` as metrics on its MLflow training run (the time as the step)")
    PERFORMANCE_WINDOW_HOURS: Positive = Field(24, description="the window of `/metrics`' live accuracy: labelled rows predicted within it")
    FEEDBACK_MAX_ITEMS: Positive = Field(10_000, description="labels in one `POST /feedback`")
    PERFORMANCE_ALERT_DROP: float = Field(0.05, ge=0, le=1, allow_inf_nan=False, description="the `ModelAccuracyDrop` alert fires when live accuracy stays this far below the version's hold-out accuracy for 30 minutes (exported as `model_accuracy_alert_floor`, once the version has `PERFORMANCE_MIN_LABELS` labelled rows)")
    PERFORMANCE_MIN_LABELS: Positive = Field(50, description="labelled rows a version needs before `/performance` gives accuracy")
    DRIFT_ENABLED: Flag = Field(True, description="count each served row against its version's drift baseline (`/drift`, `model_feature_psi` in `/metrics`)")
    DRIFT_WINDOW_SECONDS: int = Field(3600, ge=60, le=604_800, description="the window `/drift` and `/metrics` compare with the baseline, in 60 slots")
    DRIFT_MIN_ROWS: int = Field(500, ge=50, description="rows a window needs before distances are given (below: `insufficient_data`)")
    DRIFT_PSI_WARN: float = Field(0.1, gt=0, allow_inf_nan=False, description="PSI above which a feature or the prediction is `warn` (and above 3x its noise floor)")
    DRIFT_PSI_ALERT: float = Field(0.25, gt=0, allow_inf_nan=False, description="PSI above which it is `alert`; above `DRIFT_PSI_WARN`")
    DRIFT_MAX_ROWS_PER_REQUEST: Positive = Field(1_000, description="rows of one request counted for drift (evenly spaced)")
    # gunicorn (gunicorn.conf.py)
    HOST: str | None = Field(None, description="where gunicorn listens (`make run` and gunicorn.conf.py: `127.0.0.1`; `make serve`: `0.0.0.0`)")
    PORT: int = Field(8000, ge=1, le=65535, description="the port gunicorn listens on")
    WEB_CONCURRENCY: Positive = Field(2, description="gunicorn workers (`make serve`: 4)")
    GUNICORN_THREADS: Positive = Field(4, description="threads per worker")
    GUNICORN_TIMEOUT: Count = Field(120, description="seconds before a silent worker is restarted")
    GUNICORN_GRACEFUL_TIMEOUT: Count = Field(30, description="seconds a worker has to finish on a restart")
    GUNICORN_MAX_REQUESTS: Count = Field(200_000, description="requests before a worker is recycled (0: never); a safety valve against slow leaks, not a routine")
    GUNICORN_MAX_REQUESTS_JITTER: Count = Field(20_000, description="random spread of `GUNICORN_MAX_REQUESTS`")
    GUNICORN_PRELOAD: Flag = Field(True, description="load the app and model once in the master, shared by the workers")
    LOG_LEVEL: LogLevel = Field("info", description="the log level of the service and of gunicorn")
    LOG_FORMAT: Literal["json", "text"] = Field(default_factory=lambda: "text" if _stderr_is_terminal() else "json", description="`json`: one JSON object a line, with the request id (for a log stack); `text`: plain lines for a terminal. Default: `text` when stderr is a terminal (`make run` in a shell), `json` elsewhere (a container, CI, Lambda)")
    # fmt: on

    @field_validator("MLFLOW_TRACKING_URI")
    @classmethod
    def _known_scheme(cls, uri: str) -> str:
        scheme = urlparse(uri).scheme
        if scheme not in TRACKING_SCHEMES:
            raise ValueError(f"unsupported scheme {scheme!r}; one of {', '.join(s for s in TRACKING_SCHEMES if s)}")
        return uri

    @field_validator("ACTIVE_ALIAS", "ROLLOUT_ALIAS")
    @classmethod
    def _mlflow_alias(cls, alias: str) -> str:
        """MLflow's own rules for an alias name (characters, length, `latest` and `v<N>` reserved)."""
        from mlflow.exceptions import MlflowException
        from mlflow.utils import validation

        try:
            validation._validate_model_alias_name(alias)
            validation._validate_model_alias_name_reserved(alias)
        except MlflowException as exc:
            raise ValueError(exc.message) from None
        return alias

    @field_validator("PREDICTION_LOG_URL")
    @classmethod
    def _sqlalchemy_url(cls, url: str) -> str:
        if not url:
            return url
        try:
            from sqlalchemy.engine import make_url
        except ImportError:
            raise ValueError("needs SQLAlchemy, which this stack does not install; set PREDICTION_LOG=off") from None
        try:
            make_url(url)
        except Exception:
            raise ValueError("not a SQLAlchemy URL, like postgresql+psycopg2://user@host:5432/db") from None
        return url

    @field_validator("API_TOKEN", "PREDICT_TOKEN", "FEEDBACK_TOKEN")
    @classmethod
    def _no_blank_token(cls, token: SecretStr | None) -> SecretStr | None:
        value = token.get_secret_value() if token is not None else None
        if value is not None and (not value.strip() or value != value.strip()):
            raise ValueError("a token cannot be blank, nor start or end with spaces")
        return token

    @field_validator("CELERY_BROKER_TRANSPORT_OPTIONS")
    @classmethod
    def _json_object(cls, text: str) -> str:
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError("a JSON object, like {}")
        return text

    @model_validator(mode="after")
    def _derived(self) -> Settings:
        if self.TRAIN_EXECUTOR == "celery" and not self.CELERY_BROKER_URL:
            raise ValueError("TRAIN_EXECUTOR=celery needs CELERY_BROKER_URL (redis://... or sqs://...)")
        if self.DRIFT_PSI_ALERT <= self.DRIFT_PSI_WARN:
            raise ValueError(
                f"DRIFT_PSI_ALERT ({self.DRIFT_PSI_ALERT}) must be above DRIFT_PSI_WARN ({self.DRIFT_PSI_WARN})"
            )
        if self.ROLLOUT_ALIAS == self.ACTIVE_ALIAS:
            raise ValueError(f"ROLLOUT_ALIAS and ACTIVE_ALIAS must differ (both {self.ACTIVE_ALIAS!r})")
        if not self.STATE_DIR:
            object.__setattr__(self, "STATE_DIR", str(default_state_dir(self.MLFLOW_TRACKING_URI)))
        return self

    def allowed_hosts(self) -> tuple[str, ...] | None:
        """The Host names answered (lower case, IPv6 in brackets), or None for any."""
        names = self.ALLOWED_HOSTS
        if names is None:
            names = LOOPBACK_NAMES if is_loopback(self.HOST) else ("*",)
        if "*" in names:
            return None
        return tuple(_bracketed(name.lower()) for name in names)


def _bracketed(name: str) -> str:
    return f"[{name}]" if ":" in name and not name.startswith("[") else name


def is_loopback(host: str | None) -> bool:
    """True for a bind that only this machine can reach: localhost, 127.0.0.0/8, ::1."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _describe(error: dict) -> str:
    name = ".".join(str(part) for part in error["loc"]) or "settings"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{name}: not a setting"
    if any(word in name for word in ("TOKEN", "PASSWORD", "SECRET", "_URI", "_URL")):
        return f"{name}: {message}"  # never echo a secret (URIs can hold a password)
    shown = repr(error["input"])
    return f"{name}={shown[:60] + '...' if len(shown) > 60 else shown}: {message}"


def load_settings(overrides: dict | None = None) -> Settings:
    """The settings: defaults, then the environment, then `overrides`; ConfigError (one line) if any is invalid."""
    try:
        return Settings(**(overrides or {}))
    except ValidationError as exc:
        raise ConfigError("Invalid configuration: " + "; ".join(_describe(e) for e in exc.errors())) from None


def settings_to_json(settings: Settings) -> str:
    """The settings, secrets included, as JSON: what a job's process receives instead of re-reading the environment."""
    values = {
        name: value.get_secret_value() if isinstance(value, SecretStr) else value
        for name, value in settings.model_dump().items()
        if value is not None
    }
    return json.dumps(values)


def settings_from_json(text: str) -> Settings:
    """The settings `settings_to_json` wrote, checked again (every field given: the environment changes none)."""
    return load_settings(json.loads(text))


def current_settings() -> Settings:
    """The settings of the app handling the current request (the factory keeps them in `app.extensions`)."""
    return current_app.extensions["settings"]


def settings_or_exit() -> Settings:
    """The environment's settings, or exit 2 with the one-line reason (gunicorn.conf.py, before it forks; the CLIs)."""
    try:
        return load_settings()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a local SQLite tracking URI, or None for any other URI."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///") :])


def artifact_location(tracking_uri: str) -> str | None:
    """Where artifacts go for a local SQLite store: a folder beside the database file."""
    db = sqlite_path(tracking_uri)
    return (db.parent / "artifacts").as_uri() if db else None


def default_state_dir(tracking_uri: str) -> Path:
    """This machine's cache of downloaded models and its active-model pointer, one per store.

    Beside the database for a local store; under the temp folder (Lambda's /tmp) otherwise.
    """
    db = sqlite_path(tracking_uri)
    if db:
        return db.parent / "serving-state"
    digest = hashlib.sha256(tracking_uri.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"model-serving-{digest}"


def check_tracking_uri(tracking_uri: str) -> None:
    """Fail fast on a tracking URI MLflow cannot use, before any request is served."""
    scheme = urlparse(tracking_uri).scheme
    if scheme not in TRACKING_SCHEMES:
        raise ValueError(f"MLFLOW_TRACKING_URI has an unsupported scheme: {tracking_uri!r}")
