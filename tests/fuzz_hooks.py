"""schemathesis hooks for tests/test_fuzz.py (loaded by `st run` through SCHEMATHESIS_HOOKS)."""

import schemathesis


@schemathesis.hook
def before_call(context, case, kwargs):
    """A fuzzed /train or rollout never replaces the served model: later cases expect the one they were built for."""
    if case.operation.path == "/train" and isinstance(case.body, dict):
        case.body["activate"] = False if case.media_type == "application/json" else "false"
    # Nor does a fuzzed rollout promote its candidate before after_call cancels it.
    if case.operation.path == "/rollout" and case.method.upper() == "POST" and isinstance(case.body, dict):
        case.body["auto_promote"] = False


@schemathesis.hook
def after_call(context, case, response):
    """A fuzzed POST /rollout that started one is cancelled at once: later cases expect no rollout."""
    if case.operation.path == "/rollout" and case.method.upper() == "POST" and response.status_code == 201:
        import requests

        requests.delete(
            response.request.url,  # (schemathesis's Response has no `url`: the request it answered has)
            headers={"Authorization": case.headers.get("Authorization", "")} if case.headers else {},
            timeout=30,
        )
