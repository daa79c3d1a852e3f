"""A registered version in memory: its runtime (ONNX Runtime or scikit-learn), features, schema and example."""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from marshmallow import Schema

from kernel import model_format
from kernel.drift_format import Baseline, read_baseline
from kernel.errors import DomainError
from kernel.registry import ModelRef
from serving.arrays import Feature, fast_columns, onnx_probabilities, sklearn_frame
from serving.row_schema import build_schema

log = logging.getLogger(__name__)

_NUMBER_TYPES = {"double", "float", "long", "integer"}
_SESSION_LOCK = threading.Lock()
_INHERITED_SESSIONS: list = []  # sessions copied from a parent process: kept, never destroyed in the child


class ModelLoadError(DomainError):
    """The version's files are not a model this service can serve (422: the previous model keeps serving)."""

    status = 422
    code = "model_not_loadable"

    def client_message(self) -> str:
        return f"{self}. The previous model keeps serving."


class SklearnForm:
    """A version's scikit-learn pipeline, loaded on first use and kept: None where it cannot be loaded.

    A compiled version is served by ONNX Runtime and needs its scikit-learn form only to score again, in
    64 bits, a row that overflows float32 arithmetic. Loading it imports scikit-learn and skops, the
    largest part of a start's time, so a compiled version loads it only when such a row first arrives.
    """

    def __init__(self, load=None, value=None):
        self._load, self._value, self._lock = load, value, threading.Lock()

    def get(self):
        if self._load is not None:
            with self._lock:
                if self._load is not None:
                    self._value, self._load = self._load(), None
        return self._value

    @property
    def loaded(self) -> bool:
        return self._load is None


@dataclass(frozen=True)
class LoadedModel:
    """Everything a prediction needs, swapped as one object so a request never mixes two versions."""

    ref: ModelRef
    sklearn_form: SklearnForm  # the scikit-learn pipeline: see `estimator`
    features: tuple[Feature, ...]
    classes: tuple
    example: dict
    schema: Schema
    has_probabilities: bool
    runtime: str = "sklearn"  # "onnx" or "sklearn": what answers this version's predictions
    runtime_reason: str = ""
    onnx_bytes: bytes | None = field(default=None, repr=False)  # the verified compiled form, when served
    # The version's drift baseline (None: registered without one, or unreadable; predictions never need it).
    baseline: Baseline | None = field(default=None, repr=False, compare=False)
    baseline_reason: str = ""
    # This process's ONNX Runtime session: {"pid": ..., "session": ...}, made again after a fork (below).
    _session: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    # Derived once per version, not per request.
    feature_names: list = field(init=False)
    feature_set: frozenset = field(init=False)
    number_features: list = field(init=False)
    text_features: list = field(init=False)
    class_array: np.ndarray = field(init=False, repr=False)
    class_keys: list = field(init=False)
    answer_model: dict = field(init=False)

    def __post_init__(self):
        names = [f.name for f in self.features]
        set_ = object.__setattr__  # frozen: the derived fields are set once, here
        set_(self, "feature_names", names)
        set_(self, "feature_set", frozenset(names))
        set_(self, "number_features", [f.name for f in self.features if f.kind == "number"])
        set_(self, "text_features", [f.name for f in self.features if f.kind != "number"])
        set_(self, "class_array", np.asarray(self.classes, dtype=object))
        set_(self, "class_keys", [str(label) for label in self.classes])
        set_(self, "answer_model", {**self.ref.as_dict(), "runtime": self.runtime})

    @property
    def estimator(self) -> Any:
        """The scikit-learn pipeline (None where scikit-learn is not installed, or its file does not load);
        for a compiled version, loaded on first use."""
        return self.sklearn_form.get()

    @property
    def session(self):
        """The ONNX Runtime session of this process (None when scikit-learn serves the version).

        ONNX Runtime's objects do not survive fork: a gunicorn worker that inherits the master's
        session makes its own on first use, and never destroys the inherited one (that would touch
        thread state that belongs to the master).
        """
        if self.onnx_bytes is None:
            return None
        holder = self._session
        if holder.get("pid") != os.getpid():
            with _SESSION_LOCK:
                if holder.get("pid") != os.getpid():
                    if "session" in holder:
                        _INHERITED_SESSIONS.append(holder["session"])
                    holder["session"] = onnx_session(self.onnx_bytes)
                    holder["pid"] = os.getpid()
        return holder["session"]

    def describe(self) -> dict:
        """The version and how it is served, as /ready and /use-model show it."""
        return {**self.answer_model, "runtime_reason": self.runtime_reason}


def _json_value(value):
    """A value of the input example as JSON would carry it (NaN becomes null)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def onnx_session(onnx_bytes: bytes):
    """An ONNX Runtime session on one thread: a gunicorn worker is the unit of parallelism."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


def _load_estimator(path: Path, flavor: dict, ref: ModelRef):
    """The scikit-learn pipeline from its skops file, with the service's trusted types; never pickle."""
    try:
        import skops.io

        from kernel.trusted_types import TRUSTED_TYPES
    except ImportError:
        return None  # a compiled-only install (no scikit-learn): the ONNX form must serve
    try:
        return skops.io.load(path / flavor["pickled_model"], trusted=TRUSTED_TYPES)
    except Exception as exc:
        raise ModelLoadError(f"{ref.name} version {ref.version} could not be loaded: {exc}") from exc


def _load_later(path: Path, flavor: dict, ref: ModelRef):
    """The loader of a compiled version's scikit-learn form: a file that does not load is logged, and None."""

    def load():
        try:
            return _load_estimator(path, flavor, ref)
        except ModelLoadError:
            log.exception("%s version %s: its scikit-learn form does not load", ref.name, ref.version)
            return None

    return load


def load_model_dir(path: Path, ref: ModelRef, serving_runtime: str = "auto") -> LoadedModel:
    """Load a downloaded version: its verified ONNX form where it has one, and the skops pipeline.

    `serving_runtime` is SERVING_RUNTIME: "auto" serves compiled versions with ONNX Runtime,
    "sklearn" serves every version with scikit-learn.
    """
    try:
        mlmodel = _read_mlmodel(path)
    except Exception as exc:
        raise ModelLoadError(f"{ref.name} version {ref.version} has no readable MLmodel file: {exc}") from exc
    flavor = (mlmodel.get("flavors") or {}).get("sklearn")
    if not flavor or flavor.get("serialization_format") != "skops":
        raise ModelLoadError(
            f"{ref.name} version {ref.version} is not a scikit-learn model in skops format; "
            "this service does not load pickled models"
        )
    features = _features(mlmodel, ref)
    example_rows = _input_example(path, mlmodel, features, ref)
    verdict = model_format.read_verdict(path)
    onnx_bytes, reason = model_format.compiled_form(path, verdict, serving_runtime)
    if onnx_bytes is None:  # scikit-learn serves the version: load it now
        sklearn_form = SklearnForm(value=_load_estimator(path, flavor, ref))
        if sklearn_form.get() is None:
            raise _not_servable(ref, reason)
    else:
        sklearn_form = SklearnForm(load=_load_later(path, flavor, ref))
    verdict = verdict or {}
    classes = _classes(verdict, sklearn_form, ref)
    baseline, baseline_reason = read_baseline(path)
    model = LoadedModel(
        ref=ref,
        sklearn_form=sklearn_form,
        features=features,
        classes=classes,
        example=example_rows[0],
        schema=build_schema(features, f"Row_{ref.name}_{ref.version}"),
        has_probabilities=onnx_bytes is not None or hasattr(sklearn_form.get(), "predict_proba"),
        runtime="onnx" if onnx_bytes is not None else "sklearn",
        runtime_reason=reason,
        onnx_bytes=onnx_bytes,
        baseline=baseline,
        baseline_reason=baseline_reason,
    )
    if onnx_bytes is not None:
        try:
            _ = model.session  # this process's session, made once here: the file loads in this ONNX Runtime
        except Exception as exc:  # e.g. an ONNX Runtime too old for the file's opset
            model = _without_compiled_form(model, f"ONNX Runtime could not load the compiled form: {exc}")
    return _checked(model, example_rows, verdict.get("example_probabilities"))


def _not_servable(ref: ModelRef, reason: str) -> ModelLoadError:
    return ModelLoadError(
        f"{ref.name} version {ref.version} has no compiled form ({reason}) and scikit-learn is not installed"
    )


def _without_compiled_form(model: LoadedModel, reason: str) -> LoadedModel:
    """The version served by scikit-learn instead, saying why; ModelLoadError where scikit-learn is not installed."""
    from dataclasses import replace

    if model.estimator is None:
        raise _not_servable(model.ref, reason)
    log.error("%s version %s: the compiled form is not used: %s", model.ref.name, model.ref.version, reason)
    return replace(model, runtime="sklearn", runtime_reason=reason, onnx_bytes=None)


def _read_mlmodel(path: Path) -> dict:
    """The MLmodel file as YAML: MLflow's own `Model.load` imports pandas, which a compiled-only install lacks."""
    import yaml

    mlmodel = yaml.safe_load((path / "MLmodel").read_text())
    if not isinstance(mlmodel, dict):
        raise ValueError("not a YAML mapping")
    return mlmodel


def _signature_inputs(mlmodel: dict) -> list:
    """The signature's input columns as MLflow writes them: [{"name", "type", "required"}, ...]."""
    try:
        columns = json.loads((mlmodel.get("signature") or {}).get("inputs") or "[]")
    except (TypeError, ValueError):
        return []
    return columns if isinstance(columns, list) else []


def _features(mlmodel: dict, ref: ModelRef) -> tuple[Feature, ...]:
    """The features the version's signature names, in its order: number, boolean or text."""
    columns = _signature_inputs(mlmodel)
    if not columns or not all(isinstance(c, dict) and c.get("name") for c in columns):
        raise ModelLoadError(f"{ref.name} version {ref.version} has no signature with feature names")
    features = []
    for column in columns:
        kind = column.get("type")
        kind = "number" if kind in _NUMBER_TYPES else "boolean" if kind == "boolean" else "text"
        features.append(Feature(column["name"], kind, column.get("required", True)))
    return tuple(features)


def _input_example(path: Path, mlmodel: dict, features, ref: ModelRef) -> list[dict]:
    """The rows of the version's input example (MLflow's "split" or "records" JSON), read without pandas."""
    info = mlmodel.get("saved_input_example_info") or {}
    try:
        example = json.loads((path / info["artifact_path"]).read_text())
        if isinstance(example, dict):  # orient "split": {"columns": [...], "data": [[...], ...]}
            example = [dict(zip(example["columns"], row)) for row in example["data"]]
        names = [f.name for f in features]
        rows = [{name: _json_value(row[name]) for name in names} for row in example]
    except (KeyError, TypeError, ValueError, OSError):
        rows = []
    if not rows:
        raise ModelLoadError(f"{ref.name} version {ref.version} has no input example")
    return rows


def _classes(verdict: dict, sklearn_form: SklearnForm, ref: ModelRef) -> tuple:
    """The class labels in the order of the model's probabilities: the loaded pipeline's, or as compiled.json records them."""
    if sklearn_form.loaded and sklearn_form.get() is not None:
        return tuple(sklearn_form.get().classes_.tolist())
    if isinstance(verdict.get("classes"), list):
        return tuple(verdict["classes"])
    raise ModelLoadError(f"{ref.name} version {ref.version} does not record its classes")


def _checked(model: LoadedModel, example_rows: list[dict], recorded: list | None) -> LoadedModel:
    """Before a compiled version serves: ONNX agrees with scikit-learn on its input example, or sklearn serves.

    scikit-learn's answers are those recorded at registration (compiled.json), so the check needs no
    scikit-learn; a version compiled before they were recorded loads its pipeline to compare.
    """
    if model.onnx_bytes is None:
        return model
    if recorded is None and model.estimator is None:
        return model  # a compiled-only install: nothing to compare with
    columns = fast_columns(model, example_rows)
    try:
        compiled = onnx_probabilities(model, columns)
        if recorded is not None:
            expected = np.asarray(recorded, dtype=np.float64)
        else:
            expected = model.estimator.predict_proba(sklearn_frame(model, columns))
        agree = compiled.shape == expected.shape and np.allclose(compiled, expected, atol=1e-5)
        agree = (
            agree and (model_format.label_indices(compiled, True) == model_format.label_indices(expected, False)).all()
        )
    except Exception as exc:
        agree, problem = False, f"{type(exc).__name__}: {exc}"
    else:
        problem = "its answers on the input example differ from scikit-learn's"
    if agree:
        return model
    return _without_compiled_form(model, f"compiled form rejected at load: {problem}")
