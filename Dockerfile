# The service's container image, for ECS Fargate and SageMaker (real-time endpoint and training job).
# How to build, push and run it on AWS: docs/deploy-aws.md.
#
# NOTE: this file has never been built on the project's own machines: they have no Docker engine. Keep it
# simple, and build it where Docker runs (a laptop, CI with Docker, AWS CodeBuild):
#
#   docker build -t model-serving .                             # ECS Fargate (runs as the non-root user "app")
#   docker build --build-arg RUN_AS=root -t model-serving:sm .  # SageMaker, whose docs expect root containers
#   docker run -p 8000:8000 -e MLFLOW_TRACKING_URI=http://mlflow.internal:5000 model-serving
#
# Build on (or for) the CPU architecture you deploy: --platform linux/amd64 or linux/arm64 (Graviton).
#
# docker/entrypoint.sh picks what runs: no argument = gunicorn on $PORT (8000); `serve` = gunicorn on 8080
# (SageMaker's /ping and /invocations); `train ARGS` = `python -m training ARGS` (one batch training job).
#
# The image holds the composition root (service/), the shared kernel (kernel/), serving/ and training/:
# training/ is needed by the `all` and `training` roles and by the `train` job. An inference-only image can
# drop the `COPY training/` line (APP_ROLE=inference never imports it; ARCHITECTURE.md).

# ---- build stage: the pinned requirements in a virtualenv, copied whole into the runtime stage ----------
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
COPY requirements.txt /tmp/requirements.txt
RUN /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt

# ---- runtime stage ------------------------------------------------------------------------------------
FROM python:3.11-slim
# The user the processes run as: "app" (uid 10001) by default; --build-arg RUN_AS=root for SageMaker.
ARG RUN_AS=app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    APP_ROLE=inference \
    HOST=0.0.0.0 \
    PORT=8000 \
    OMP_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 \
    MKL_NUM_THREADS=1
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY service/ service/
COPY kernel/ kernel/
COPY serving/ serving/
COPY training/ training/
COPY wsgi.py gunicorn.conf.py ./
COPY docker/entrypoint.sh docker/entrypoint.sh
RUN chmod 0755 docker/entrypoint.sh
USER ${RUN_AS}
# 8000: gunicorn's default port (ECS, docker run). 8080: SageMaker's contract (`serve`).
EXPOSE 8000 8080
# Liveness for `docker run` and Compose: GET /health on $PORT or 8080, with python (slim images have no curl).
# ECS ignores an image's HEALTHCHECK (set healthCheck in the task definition); SageMaker uses GET /ping.
# A `train` job serves nothing, so its health status means nothing.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["/app/docker/entrypoint.sh", "healthcheck"]
ENTRYPOINT ["/app/docker/entrypoint.sh"]
