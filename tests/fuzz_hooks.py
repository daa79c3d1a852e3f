"""schemathesis hooks for tests/test_fuzz.py (loaded by `st run` through SCHEMATHESIS_HOOKS)."""

import schemathesis


@schemathesis.hook
def before_call(context, case, kwargs):
    """A fuzzed /train never replaces the served model: later cases expect the one they were built for."""
    if case.operation.path == "/train" and isinstance(case.body, dict):
        case.body["activate"] = False if case.media_type == "application/json" else "false"
