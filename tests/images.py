"""The container images for the tests and scripts/measure_image.py: build them (`make image`), run their
processes, read their files.

Where a Docker engine answers, `docker run` runs them (host network). Otherwise buildah does: `buildah from`
the image, then `buildah run --isolation chroot`, as the image's user, with its environment, working
folder and entrypoint read from the image's own configuration. That runs what the image holds (files,
virtualenv, user, entrypoint, ports); it is not an engine's isolation: the process shares the host's
network and sees no cgroup limits. (`podman run` fails on this project's machines: crun cannot use their
hybrid cgroups.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

IMAGE = os.environ.get("TEST_IMAGE", "model-serving-test")
LOCAL_BASE = "localhost/debian-python:bookworm"


def builder() -> str | None:
    """docker where an engine answers, else buildah where installed, else None."""
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0:
        return "docker"
    return "buildah" if shutil.which("buildah") else None


def require_builder() -> str:
    """Skip where nothing can build an image; CI sets REQUIRE_IMAGE=1, which makes that a failure."""
    found = builder()
    if found is None:
        message = "neither a Docker engine nor buildah is here (apt-get install buildah podman mmdebstrap)"
        if os.environ.get("REQUIRE_IMAGE") == "1":
            pytest.fail(f"{message}, and REQUIRE_IMAGE=1")
        pytest.skip(f"{message}; set REQUIRE_IMAGE=1 to make this a failure")
    return found


def base_image(tool: str) -> str:
    """TEST_IMAGE_BASE, else python:3.11-slim for Docker and the Debian-packaged base (`make image-base`) for buildah."""
    if os.environ.get("TEST_IMAGE_BASE"):
        return os.environ["TEST_IMAGE_BASE"]
    return "python:3.11-slim" if tool == "docker" else LOCAL_BASE


def build(tool: str, targets: tuple[str, ...] = ("inference", "full")) -> dict:
    """`make image-base` (for the local base) and `make image`; returns the seconds each took."""
    base, seconds = base_image(tool), {}
    if base == LOCAL_BASE:
        started = time.monotonic()
        make("image-base")
        seconds["image-base"] = time.monotonic() - started
    started = time.monotonic()
    make("image", f"BASE_IMAGE={base}", f"IMAGE={IMAGE}", f"IMAGE_TARGETS={' '.join(targets)}",
         f"IMAGE_BUILDER={tool}")  # fmt: skip
    seconds["image"] = time.monotonic() - started
    return seconds


def make(*args: str) -> None:
    done = subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=1800)  # fmt: skip
    assert done.returncode == 0, f"make {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def reference(tool: str, target: str) -> str:
    return f"{IMAGE}:{target}" if tool == "docker" else f"localhost/{IMAGE}:{target}"


def config(tool: str, target: str) -> dict:
    """The image's configuration: User, Env, Entrypoint, Cmd, WorkingDir, Volumes, ExposedPorts."""
    if tool == "docker":
        command = ["docker", "image", "inspect", reference(tool, target)]
        return json.loads(subprocess.check_output(command))[0]["Config"]
    command = ["buildah", "inspect", "--type", "image", reference(tool, target)]
    return json.loads(subprocess.check_output(command))["Docker"]["config"]


def size_bytes(tool: str, target: str) -> int:
    """The image's uncompressed size, as `docker images` / `podman images` give it."""
    if tool == "docker":
        command = ["docker", "image", "inspect", "--format", "{{.Size}}", reference(tool, target)]
    else:
        command = ["podman", "image", "inspect", "--format", "{{.Size}}", reference(tool, target)]
    return int(subprocess.check_output(command).strip())


class Container:
    """One container of an image: run() starts its entrypoint with arguments, as the image's user, with
    `data` (a host folder) as its /data volume and the extra environment; files() lists its paths."""

    def __init__(self, tool: str, target: str, data: Path):
        self.tool, self.target, self.data = tool, target, data
        self.config = config(tool, target)
        self.name = None
        self.processes: list[subprocess.Popen] = []
        data.mkdir(parents=True, exist_ok=True)
        os.chown(data, 10001, 10001)  # the image's user "app" must own its volume, as a fresh named volume
        if tool == "buildah":
            self.name = subprocess.check_output(["buildah", "from", "--pull=false", reference(tool, target)],
                                                text=True).strip()  # fmt: skip
            # buildah run gives an image's VOLUME a throwaway copy that hides a bind mount of the same folder:
            # the working container forgets the declaration, and /data is the host folder `data`.
            subprocess.run(["buildah", "config", "--volume", "/data-", self.name], check=True, capture_output=True)
            self.root = Path(subprocess.check_output(["buildah", "mount", self.name], text=True).strip())

    def command(self, args: list[str], env: dict, user: str | None = None, entrypoint: bool = True) -> list[str]:
        user = user or self.config.get("User") or "root"
        program = [*(self.config.get("Entrypoint") or []), *args] if entrypoint else args
        environment = [f"{k}={v}" for k, v in env.items()]
        if self.tool == "docker":
            flags = ["--rm", "--network", "host", "--user", user, "-v", f"{self.data}:/data"]
            flags += [flag for item in environment for flag in ("-e", item)]
            return [
                "docker",
                "run",
                *flags,
                "--entrypoint",
                program[0],
                reference(self.tool, self.target),
                *program[1:],
            ]
        flags = ["--isolation", "chroot", "--user", user, "-v", f"{self.data}:/data"]
        flags += [flag for item in environment for flag in ("-e", item)]
        return ["buildah", "run", *flags, self.name, "--", *program]

    def start(self, args: list[str], env: dict, log: Path, **kwargs) -> subprocess.Popen:
        """The process in its own process group (stop() ends the group: buildah's chroot child with it)."""
        with open(log, "ab") as output:
            process = subprocess.Popen(self.command(args, env, **kwargs), stdout=output, stderr=subprocess.STDOUT,
                                       start_new_session=True)  # fmt: skip
        self.processes.append(process)
        return process

    def run(self, args: list[str], env: dict, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(args, env, **kwargs), capture_output=True, text=True, timeout=timeout)

    @staticmethod
    def stop(process: subprocess.Popen, timeout: float = 30) -> None:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def files(self) -> list[str]:
        """Every path in the image's filesystem (not /proc, /sys, /dev), relative to its root."""
        if self.tool == "docker":
            created = subprocess.check_output(["docker", "create", reference(self.tool, self.target)], text=True)
            try:
                export = subprocess.Popen(["docker", "export", created.strip()], stdout=subprocess.PIPE)
                names = subprocess.check_output(["tar", "-t"], stdin=export.stdout, text=True).splitlines()
                export.wait()
            finally:
                subprocess.run(["docker", "rm", created.strip()], capture_output=True)
            return [name.rstrip("/") for name in names]
        paths = []
        for folder, subfolders, names in os.walk(self.root):
            relative = os.path.relpath(folder, self.root)
            if relative in ("proc", "sys", "dev"):
                subfolders[:] = []
                continue
            paths += [os.path.normpath(os.path.join(relative, name)) for name in subfolders + names]
        return paths

    def changed_since(self, marker: float) -> list[str]:
        """Files of the container's own filesystem (not the /data volume) changed after `marker` (buildah only)."""
        changed = []
        for folder, subfolders, names in os.walk(self.root):
            relative = os.path.relpath(folder, self.root)
            if relative in ("proc", "sys", "dev", "run", "data") or relative.startswith("data/"):
                subfolders[:] = []
                continue
            for name in names:
                path = os.path.join(folder, name)
                try:
                    if os.lstat(path).st_mtime > marker:
                        changed.append(os.path.join(relative, name))
                except FileNotFoundError:
                    pass
        return changed

    def remove(self) -> None:
        for process in self.processes:
            self.stop(process)
        if self.name is not None:
            subprocess.run(["buildah", "umount", self.name], capture_output=True)
            subprocess.run(["buildah", "rm", self.name], capture_output=True)
            self.name = None
