"""Run Zappa's real handler in this process the way the Lambda python runtime does.

    python3.12 -S tests/lambda_invoke.py TASK_DIR RUNTIME_DIR < events.json   (a JSON list of API Gateway events)

-S: no site-packages of the interpreter that runs this; the import path is the package (/var/task)
and then RUNTIME_DIR (what /var/runtime provides: boto3). Prints one JSON line per event:
{"seconds": <time since this process started>, "response": <what lambda_handler returned>}.
"""

import json
import os
import sys
import time

STARTED = time.time()
task_dir, runtime_dir = sys.argv[1], sys.argv[2]
sys.path[:0] = [task_dir, runtime_dir]
os.chdir(task_dir)  # Lambda's cwd is /var/task
events = json.load(sys.stdin)


class Context:  # the parts of LambdaContext a handler may read
    function_name = "model-serving-test"
    aws_request_id = "00000000-0000-0000-0000-000000000000"
    memory_limit_in_mb = 2048

    @staticmethod
    def get_remaining_time_in_millis():
        return 30_000


from handler import lambda_handler  # noqa: E402 - zappa's handler.py at the package root

for event in events:
    response = lambda_handler(event, Context())
    print(json.dumps({"seconds": time.time() - STARTED, "response": response}), flush=True)
