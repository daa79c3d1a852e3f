#!/bin/sh
# The container's entry point (Dockerfile ENTRYPOINT). docs/deploy-aws.md says where each form is used.
#
#   (no argument)      gunicorn on HOST:PORT (ECS Fargate, docker run): gunicorn.conf.py, wsgi:app
#   -<gunicorn flags>  the same, with extra gunicorn options, e.g. `docker run IMAGE --workers 1`
#   serve [flags]      SageMaker real-time endpoint (`docker run IMAGE serve`): gunicorn on 0.0.0.0:8080
#                      (or $SAGEMAKER_BIND_TO_PORT), where SageMaker calls GET /ping and POST /invocations
#   train [args]       one training job: `python -m training ARGS` (ECS task, AWS Batch). With no ARGS inside
#                      a SageMaker training job, the job's hyperparameters become the arguments
#                      ({"estimator": "SVC", "dataset": "wine", "params": "{\"C\": 2}"} -> --estimator SVC ...)
#   worker [args]      a Celery training worker for TRAIN_EXECUTOR=celery (the full image; `make worker`)
#   healthcheck        exit 0 when GET /health answers on $PORT or on 8080 (the Dockerfile HEALTHCHECK)
#   anything else      run as a command, e.g. `docker run IMAGE python -m training --help`
#
# Secrets: for each of API_TOKEN, MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD
# that is empty, if <NAME>_SSM_PARAMETER is set, the value is read from that SSM parameter (a name, an ARN,
# or /aws/reference/secretsmanager/<secret-id> for a Secrets Manager secret) with decryption. ECS can inject
# secrets itself (task definition "secrets"); this is for SageMaker, which cannot.
#
# Every server form ends in `exec`, so gunicorn is PID 1 and receives SIGTERM from ECS and SageMaker.
set -eu

cd "$(dirname "$0")/.."

# The image keeps all state under /data, a volume that may start empty (or be a fresh ECS/Fargate volume):
# its folders are made here, and a folder this user cannot write stops the start with one line.
for folder in ${HOME:+"$HOME"} ${TMPDIR:+"$TMPDIR"}; do
    mkdir -p "$folder" 2>/dev/null && [ -w "$folder" ] || {
        echo "entrypoint: $folder is not writable by $(id -un 2>/dev/null || id -u); mount a volume there that is" >&2
        exit 1
    }
done

resolve_secrets() {
    for name in API_TOKEN MLFLOW_TRACKING_URI MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD; do
        eval "current=\${$name:-}"
        eval "parameter=\${${name}_SSM_PARAMETER:-}"
        # shellcheck disable=SC2154  # both are set by the eval lines above
        if [ -z "$current" ] && [ -n "$parameter" ]; then
            value=$(python -c '
import os, sys
import boto3
name = sys.argv[1]
# A parameter ARN names its region; otherwise boto3 uses AWS_REGION / AWS_DEFAULT_REGION.
region = name.split(":")[3] if name.startswith("arn:") else None
ssm = boto3.client("ssm", region_name=region)
print(ssm.get_parameter(Name=name, WithDecryption=True)["Parameter"]["Value"])
' "$parameter") || {
                echo "entrypoint: could not read $name from SSM parameter $parameter" >&2
                exit 1
            }
            export "$name=$value"
        fi
    done
}

command="${1:-}"
case "$command" in
    "" | -*)
        resolve_secrets
        exec gunicorn --config gunicorn.conf.py "$@" wsgi:app
        ;;
    serve)
        shift
        resolve_secrets
        # SageMaker's contract: listen on 8080 on every interface; multi-container endpoints name the port.
        export HOST=0.0.0.0
        export PORT="${SAGEMAKER_BIND_TO_PORT:-8080}"
        exec gunicorn --config gunicorn.conf.py "$@" wsgi:app
        ;;
    train)
        shift
        resolve_secrets
        hyperparameters=/opt/ml/input/config/hyperparameters.json
        if [ "$#" -eq 0 ] && [ -f "$hyperparameters" ]; then
            exec python -c '
import json, sys
from training.__main__ import main

with open(sys.argv[1]) as f:
    hyperparameters = json.load(f)
argv = []
for key, value in hyperparameters.items():
    if key.startswith("sagemaker_"):  # set by the SageMaker SDK, not ours
        continue
    flag = "--" + key.replace("_", "-")
    if flag == "--no-activate":
        if str(value).strip().lower() in ("1", "true", "yes"):
            argv.append(flag)
        continue
    argv += [flag, value if isinstance(value, str) else json.dumps(value)]
sys.exit(main(argv))
' "$hyperparameters"
        fi
        exec python -m training "$@"
        ;;
    worker)
        shift
        resolve_secrets
        exec python -m training.celery_worker "$@"
        ;;
    healthcheck)
        exec python -c '
import os, sys, urllib.request

for port in dict.fromkeys((os.environ.get("PORT", "8000"), "8080")):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=4) as answer:
            if answer.status == 200:
                sys.exit(0)
    except OSError:
        pass
sys.exit(1)
'
        ;;
    *)
        exec "$@"
        ;;
esac
