"""The images' figures for the README: build time (cold and warm), sizes, and the inference image's start
to its first prediction. Run as root where buildah (or a Docker engine) is: `.venv/bin/python scripts/measure_image.py`.

--cold first removes what makes a build fast (build/wheels, the base image tarball and image, the builder's
layer cache: --no-cache) and uses an empty pip cache, so the first build downloads everything.
The start is measured from the entrypoint's launch to the first 200 from /predict, against an `mlflow server`
on loopback holding a compiled version (RUNS times; the median and the range are printed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import images  # noqa: E402
from tests.conftest import ROOT, free_port, mlflow_client  # noqa: E402
from tests.servers import mlflow_server_with  # noqa: E402
from tests.test_image import COMPILED, first_prediction  # noqa: E402


def timed_build(tool: str, cold: bool) -> None:
    env = dict(os.environ)
    if cold:
        shutil.rmtree(ROOT / "build" / "wheels", ignore_errors=True)
        shutil.rmtree(ROOT / "build" / "image-base", ignore_errors=True)
        subprocess.run(["podman", "rmi", "--force", images.LOCAL_BASE], capture_output=True)
        env["PIP_CACHE_DIR"] = tempfile.mkdtemp(prefix="measure-pip-")
        env["IMAGE_BUILD_FLAGS"] = "--no-cache"
    os.environ.update(env)
    seconds = images.build(tool)
    print(
        f"{'cold' if cold else 'warm'} build ({tool}): " + ", ".join(f"make {k} {v:.1f} s" for k, v in seconds.items())
    )
    for key in ("PIP_CACHE_DIR", "IMAGE_BUILD_FLAGS"):
        os.environ.pop(key, None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cold", action="store_true")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    tool = images.builder()
    if tool is None:
        sys.exit("neither a Docker engine nor buildah is here")
    if args.cold:
        timed_build(tool, cold=True)
    timed_build(tool, cold=False)
    for target in ("inference", "full"):
        print(f"{target}: {images.size_bytes(tool, target) / 1e6:.0f} MB uncompressed")
    folder = Path(tempfile.mkdtemp(prefix="measure-image-"))
    trainings = [["--estimator", "RandomForestClassifier", "--dataset", "iris", "--model-name", COMPILED]]
    with mlflow_server_with(folder, trainings, env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}) as uri:
        mlflow_client(uri).set_registered_model_alias(COMPILED, "active", "1")
        times = []
        for run in range(args.runs):
            container = images.Container(tool, "inference", folder / f"data-{run}")
            try:
                port, log = free_port(), folder / f"run-{run}.log"
                env = {"MLFLOW_TRACKING_URI": uri, "API_TOKEN": "measure", "HOST": "127.0.0.1", "PORT": str(port)}
                started = time.monotonic()
                process = container.start([], env, log)
                first_prediction(f"http://127.0.0.1:{port}", process, log)
                times.append(time.monotonic() - started)
            finally:
                container.remove()
    print(f"inference image, entrypoint start to first prediction ({tool}, WEB_CONCURRENCY=2, {args.runs} runs):"
          f" median {statistics.median(times):.2f} s, {min(times):.2f} to {max(times):.2f} s;"
          f" load average {os.getloadavg()[0]:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
