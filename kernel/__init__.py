"""The shared kernel: settings, the registry, the compiled-model format and the HTTP pieces both halves use.

It imports neither `serving` nor `training`, nor scikit-learn.
"""
