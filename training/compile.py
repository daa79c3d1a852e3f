"""A fitted pipeline's compiled (ONNX) form, kept only when it agrees with scikit-learn on real rows.

The service's pipelines take one input per raw column (numbers as float32, text as strings), so the
ONNX graph takes exactly the columns `/predict` receives, with no DataFrame in between. A version is
marked compiled only when ONNX Runtime gives the same labels as scikit-learn on the hold-out rows and
the training rows, and probabilities within `TOLERANCE`; otherwise it is marked with the reason and
served by scikit-learn.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from kernel.model_format import MISSING_TEXT, PROBABILITY_OUTPUT, label_indices, onnx_feeds

log = logging.getLogger(__name__)

TOLERANCE = 1e-5
# ai.onnx 18 with ai.onnx.ml 3 is what skl2onnx 1.20 and ONNX Runtime 1.32 agree on for every estimator here.
TARGET_OPSET = {"": 18, "ai.onnx.ml": 3}


@dataclass(frozen=True)
class Compiled:
    """The outcome of compiling one version: the ONNX bytes when it passed, the reason when it did not."""

    onnx: bytes | None
    reason: str

    @property
    def runtime(self) -> str:
        return "onnx" if self.onnx is not None else "sklearn"


def onnx_inputs(features: pd.DataFrame) -> dict[str, str]:
    """Each column's ONNX input type: "float" for numbers (float32), "string" for text."""
    return {str(c): ("float" if features[c].dtype.kind == "f" else "string") for c in features.columns}


def feeds_from_frame(features: pd.DataFrame) -> dict[str, np.ndarray]:
    """A frame as ONNX Runtime's inputs, by the format's feed rule (missing text as "")."""
    kinds = onnx_inputs(features)
    numbers = {column: features[column].to_numpy(dtype=np.float32) for column, kind in kinds.items() if kind == "float"}
    texts = {column: features[column].tolist() for column, kind in kinds.items() if kind == "string"}
    return onnx_feeds(numbers, texts)


def _convert(pipeline, features: pd.DataFrame) -> bytes:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType

    types = {"float": FloatTensorType([None, 1]), "string": StringTensorType([None, 1])}
    initial = [(name, types[kind]) for name, kind in onnx_inputs(features).items()]
    # Probabilities as one tensor in the order of classes_ (no ZipMap of dicts).
    onnx_model = convert_sklearn(pipeline, initial_types=initial, options={"zipmap": False}, target_opset=TARGET_OPSET)
    return onnx_model.SerializeToString()


def _empty_text_values(features: pd.DataFrame) -> list[str]:
    """Text columns where "" is a real value: it cannot also stand for "missing" in the ONNX form."""
    return [c for c, kind in onnx_inputs(features).items() if kind == "string" and (features[c] == MISSING_TEXT).any()]


def _for_onnx(pipeline):
    """The pipeline with its text imputers reading "" as missing (ONNX strings cannot be NaN).

    The fitted values are kept, so the copy imputes exactly what the original imputes; the service
    sends a missing text value to ONNX Runtime as "".
    """
    import copy

    from sklearn.impute import SimpleImputer

    converted = copy.deepcopy(pipeline)
    preprocess = converted.named_steps["preprocess"]
    for name, transformer, _ in preprocess.transformers_:
        if name == "text":
            for step in transformer.named_steps.values():
                if isinstance(step, SimpleImputer):
                    step.missing_values = MISSING_TEXT
    return converted


def compare(pipeline, session, features: pd.DataFrame) -> float:
    """The largest probability difference between ONNX Runtime (`session`) and scikit-learn on these rows.

    Raises ValueError when any label the service would answer differs from scikit-learn's predict().
    """
    (onnx_probabilities,) = session.run([PROBABILITY_OUTPUT], feeds_from_frame(features))
    # Labels as the service answers them from each runtime's probabilities.
    served = label_indices(onnx_probabilities, compiled=True)
    expected_labels = pipeline.predict(features)
    classes = np.asarray(pipeline.classes_)
    differing = int((classes[served] != expected_labels).sum())
    if differing:
        raise ValueError(f"{differing} of {len(features)} rows get another label from ONNX Runtime")
    expected = pipeline.predict_proba(features)
    return float(np.abs(onnx_probabilities - expected).max())


def compile_pipeline(pipeline, train_features: pd.DataFrame, holdout_features: pd.DataFrame) -> Compiled:
    """Convert `pipeline` to ONNX and verify it on the hold-out and training rows; never raises."""
    empty = _empty_text_values(pd.concat([train_features, holdout_features]))
    if empty:
        return Compiled(None, f'the text columns {empty} hold "" as a value; ONNX would read it as missing')
    try:
        onnx_bytes = _convert(_for_onnx(pipeline), train_features)
    except Exception as exc:  # skl2onnx raises many kinds for an unsupported estimator or option
        step = type(pipeline.steps[-1][1]).__name__
        return Compiled(None, f"{step} could not be converted to ONNX: {type(exc).__name__}: {str(exc)[:300]}")
    try:
        import onnxruntime

        # One session for both checks: building it costs more than running a few thousand rows.
        session = onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        difference = max(compare(pipeline, session, rows) for rows in (holdout_features, train_features))
    except Exception as exc:
        return Compiled(None, f"the ONNX form does not agree with scikit-learn: {str(exc)[:300]}")
    if difference > TOLERANCE:
        return Compiled(None, f"ONNX probabilities differ from scikit-learn's by {difference:.2e} (> {TOLERANCE})")
    return Compiled(onnx_bytes, f"verified on {len(holdout_features)} hold-out and {len(train_features)} training rows")
