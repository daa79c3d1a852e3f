"""skops trusts exactly the types the allow-listed estimators need: none missing, none extra."""

from __future__ import annotations

import numpy as np
import pandas as pd
import skops.io

from kernel.trusted_types import TRUSTED_TYPES
from training.datasets import from_frame, load_builtin
from training.estimators import ESTIMATORS
from training.pipeline import build_pipeline

VARIANTS = {"KNeighborsClassifier": [{}, {"p": 1}], "SVC": [{}, {"kernel": "linear"}]}


def mixed_dataset():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {"x": rng.normal(size=60), "colour": rng.choice(["red", "blue"], size=60), "y": rng.choice(["a", "b"], size=60)}
    )
    frame.loc[3, "x"] = np.nan
    return from_frame(frame, "y", "mixed", "inline", {"max_rows": 1000, "max_columns": 10})


def test_trusted_types_are_exactly_what_the_estimators_need():
    needed = set()
    for name in ESTIMATORS:
        for params in VARIANTS.get(name, [{}]):
            for dataset in (load_builtin("iris"), mixed_dataset()):
                model = build_pipeline(dataset.features, name, params).fit(dataset.features, dataset.labels)
                untrusted = set(skops.io.get_untrusted_types(data=skops.io.dumps(model)))
                assert untrusted <= set(TRUSTED_TYPES), f"{name} needs {untrusted - set(TRUSTED_TYPES)}"
                needed |= untrusted
    assert needed == set(TRUSTED_TYPES)
