"""The rollout's owner acting within the poll that decides (serving/rollout_owner.py, serving/model_store.py): in
process, with the two versions of tests/test_rollout.py."""

from __future__ import annotations

import time

from service import create_app
from tests.conftest import client_of
from tests.test_rollout import rows, start, versions  # noqa: F401 - versions is a fixture


def test_the_instance_that_decides_a_step_shows_it_with_the_new_percent(store, app_config, versions):  # noqa: F811
    """The poll that runs the owner's decision reads the moved rollout at once: GET /rollout never gives a step's
    decision beside the old percent (it did until the next poll)."""
    store["registry"].set_active_model(versions[0])
    app = create_app({**app_config, "ROLLOUT_REPORT_SECONDS": 0.05})
    client = client_of(app)
    try:
        start(client, versions, step_min_requests=5, step_min_seconds=0, auto_promote=True)

        def traffic_then_one_poll():
            for index in range(200):  # about 20 on the candidate at 10 %, 100 at 50 %
                client.post("/predict", json=rows(1, seed=index)[0], headers={"X-User-Id": f"user-{index}"})
            time.sleep(0.1)  # the owner's next report is due
            app.extensions["model_store"].follow_registry()  # one poll: report, decide, act

        traffic_then_one_poll()
        state = client.get("/rollout").get_json()
        assert state["last_decision"]["action"] == "step", state["last_decision"]
        assert (state["percent"], state["rollout"]["step"], state["reason"]) == (50, 1, "step 2 of 2")
        traffic_then_one_poll()  # the last step passes: promoted, and served by the same poll
        assert client.get("/rollout").get_json() == {"state": "none"}
        assert client.post("/predict", json=rows(1)[0]).headers["X-Model-Version"] == versions[1].version
    finally:
        client.delete("/rollout")
        app.extensions["model_store"].stop()
        store["registry"].set_active_model(store["default"])
