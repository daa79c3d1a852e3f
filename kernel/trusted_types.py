"""The types skops may rebuild when a model is loaded: exactly those the allow-listed estimators need.

skops already trusts scikit-learn's plain estimators and transformers; these are the extra types the
fitted models of training.estimators contain (tree structures, distance metrics, calibrators). The
list is the service's own and is passed to skops on every load: the list a model carries in its
MLmodel file is not used. tests/test_trusted_types.py checks it against every allow-listed estimator.
"""

TRUSTED_TYPES = [
    "numpy.dtype",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.metrics._dist_metrics.EuclideanDistance64",
    "sklearn.metrics._dist_metrics.ManhattanDistance64",
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.tree._tree.Tree",
]
