# syntax=docker/dockerfile:1
# The service's container images, for ECS Fargate and SageMaker (real-time endpoint and training job).
# `make image` builds both, with `docker build` where a Docker engine answers and with buildah otherwise;
# `make test` builds and runs them (tests/test_image.py). How to push and run them on AWS: docs/deploy-aws.md.
#
#   inference  (the default target)  the compiled-only stack of the production_compiled Lambda stage: ONNX
#              Runtime and numpy, no scikit-learn, scipy or pandas; serves versions with a compiled (ONNX)
#              form, and says why a version without one is not ready. ECS Fargate, SageMaker endpoints.
#   full       training and inference: APP_ROLE=all (the default here), training, the `train` job mode and
#              the Celery `worker`.
#
# Installs are offline: `make image` downloads the pinned requirements' wheels on the host into build/wheels
# (part of the build context), and the build installs them with uv, --no-index. By hand:
#
#   make image-wheels                                        # build/wheels, once per requirements change
#   docker build --target inference -t model-serving:inference .
#   docker build --target full -t model-serving:full .
#   docker build --build-arg RUN_AS=root --target inference -t model-serving:sm .   # SageMaker expects root
#   docker run -p 8000:8000 -v model-serving-data:/data -e MLFLOW_TRACKING_URI=http://mlflow.internal:5000 \
#       model-serving:inference
#
# BASE_IMAGE: any Debian-like image with python3 (3.11) on PATH and python3-venv: the official python:3.11-slim
# (the default; Python in /usr/local/bin) or the Debian-packaged one `make image-base` builds for machines that
# reach no container registry (Python in /usr/bin). Build on (or for) the CPU architecture you deploy
# (--platform linux/amd64 or linux/arm64 with IMAGE_ARCH=aarch64 for the wheels).
#
# Both images run as the non-root user "app" (uid 10001) and write only under /data (a volume): the
# state folder (STATE_DIR: model cache, active-model pointer, API token, jobs), the temp folder (TMPDIR:
# gunicorn's and Prometheus's files) and, with no tracking server, the embedded MLflow store. The root
# filesystem can be read-only (ECS readonlyRootFilesystem).
#
# docker/entrypoint.sh picks what runs: no argument = gunicorn on $PORT (8000); `serve` = gunicorn on 8080
# (SageMaker's /ping and /invocations); `train ARGS` = `python -m training ARGS` (one batch training job);
# `worker ARGS` = a Celery training worker (full image).

ARG BASE_IMAGE=python:3.11-slim

# ---- uv, from the downloaded wheels --------------------------------------------------------------------
FROM ${BASE_IMAGE} AS installer
# What a step reads is copied (not only mounted) so that a builder's layer cache sees when it changes.
COPY requirements-uv.txt /tmp/requirements/
RUN --mount=type=bind,source=build/wheels,target=/wheels \
    python3 -m venv /opt/uv \
    && /opt/uv/bin/python -m pip install --quiet --no-index --find-links /wheels --no-compile --disable-pip-version-check uv

# ---- the virtualenvs: the pinned requirements, offline, trimmed (docker/slim_venv.py) ----------------------
FROM installer AS venv-inference
# The AWS services the inference image calls: S3 (artifacts), SSM and Secrets Manager (secrets at start),
# STS and SSO (credentials). botocore's descriptions of the other ~400 are left out (28 MB).
ARG BOTOCORE_SERVICES=s3,ssm,secretsmanager,sts,sso,sso-oidc
COPY requirements-inference.txt requirements-lambda-compiled.txt docker/slim_venv.py /tmp/requirements/
RUN --mount=type=bind,source=build/wheels,target=/wheels \
    /opt/uv/bin/uv venv --quiet --python python3 /opt/venv \
    && /opt/uv/bin/uv pip install --quiet --python /opt/venv/bin/python --no-cache --no-index --find-links /wheels \
        -r /tmp/requirements/requirements-inference.txt \
    && python3 /tmp/requirements/slim_venv.py /opt/venv --botocore-services "$BOTOCORE_SERVICES"

FROM installer AS venv-full
COPY requirements.txt docker/slim_venv.py /tmp/requirements/
RUN --mount=type=bind,source=build/wheels,target=/wheels \
    /opt/uv/bin/uv venv --quiet --python python3 /opt/venv \
    && /opt/uv/bin/uv pip install --quiet --python /opt/venv/bin/python --no-cache --no-index --find-links /wheels \
        -r /tmp/requirements/requirements.txt \
    && python3 /tmp/requirements/slim_venv.py /opt/venv

# ---- what both images share: the user, the state folder, the settings -----------------------------------
FROM ${BASE_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    HOME=/data/home \
    TMPDIR=/data/tmp \
    STATE_DIR=/data/state \
    MLFLOW_TRACKING_URI=sqlite:////data/mlflow/mlflow.db \
    OMP_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 \
    MKL_NUM_THREADS=1
# No useradd: the Debian-packaged base has no passwd package. /data belongs to app, everything else to root.
RUN echo 'app:x:10001:10001:model-serving:/data/home:/usr/sbin/nologin' >> /etc/passwd \
    && echo 'app:x:10001:' >> /etc/group \
    && mkdir -p /data/home /data/tmp /data/state /data/mlflow \
    && chown -R 10001:10001 /data
WORKDIR /app
# 8000: gunicorn's default port (ECS, docker run). 8080: SageMaker's contract (`serve`).
EXPOSE 8000 8080
# Liveness for `docker run` and Compose: GET /health on $PORT or 8080, with python (slim images have no curl).
# ECS ignores an image's HEALTHCHECK (set healthCheck in the task definition); SageMaker uses GET /ping.
# A `train` job or a `worker` serves nothing, so its health status means nothing.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["/app/docker/entrypoint.sh", "healthcheck"]
ENTRYPOINT ["/app/docker/entrypoint.sh"]

# ---- full: training and inference -----------------------------------------------------------------------
FROM runtime AS full
# The user the processes run as: "app" (uid 10001) by default; --build-arg RUN_AS=root for SageMaker.
ARG RUN_AS=app
COPY --from=venv-full /opt/venv /opt/venv
COPY service/ service/
COPY kernel/ kernel/
COPY serving/ serving/
COPY training/ training/
COPY wsgi.py gunicorn.conf.py ./
COPY docker/entrypoint.sh docker/precompile.py docker/
# Bytecode of what a start imports, compiled now (docker/precompile.py): a read-only root cannot take it later.
RUN chmod 0755 docker/entrypoint.sh \
    && mkdir /tmp/precompile && PYTHONDONTWRITEBYTECODE= HOME=/tmp/precompile TMPDIR=/tmp/precompile python3 docker/precompile.py \
    && rm -rf /tmp/precompile
ENV APP_ROLE=all
VOLUME /data
USER ${RUN_AS}

# ---- inference: the compiled-only stack (the default target: the last) ----------------------------------
FROM runtime AS inference
ARG RUN_AS=app
COPY --from=venv-inference /opt/venv /opt/venv
COPY service/ service/
COPY kernel/ kernel/
COPY serving/ serving/
COPY wsgi.py gunicorn.conf.py ./
COPY docker/entrypoint.sh docker/precompile.py docker/
RUN chmod 0755 docker/entrypoint.sh \
    && mkdir /tmp/precompile && PYTHONDONTWRITEBYTECODE= HOME=/tmp/precompile TMPDIR=/tmp/precompile python3 docker/precompile.py \
    && rm -rf /tmp/precompile
# The prediction log needs SQLAlchemy, alembic and a database driver (about 31 MB): over this image's 350 MB
# budget, so it is off here, as on Lambda. The full image has it; so does this one with those packages added.
ENV APP_ROLE=inference PREDICTION_LOG=off
VOLUME /data
USER ${RUN_AS}
