#!/usr/bin/env bash
# Build the images (`make image`): `docker build` where a Docker engine answers, buildah otherwise.
# Usage: scripts/build_image.sh [TARGET...]   (default: inference full; each is tagged $IMAGE:TARGET)
# BASE_IMAGE (default python:3.11-slim) and RUN_AS (default app) go to the Dockerfile as build arguments;
# IMAGE_BUILD_FLAGS go to the builder as they are (e.g. --no-cache).
# The wheels must be in build/wheels first (`make image-wheels`, which `make image` runs).
set -euo pipefail
cd "$(dirname "$0")/.."
image=${IMAGE:-model-serving}
base=${BASE_IMAGE:-python:3.11-slim}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(inference full)
[ -d build/wheels ] || { echo "no build/wheels: run make image-wheels first" >&2; exit 1; }

if [ -z "${IMAGE_BUILDER:-}" ]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        IMAGE_BUILDER=docker
    elif command -v buildah >/dev/null; then
        IMAGE_BUILDER=buildah
    else
        echo "make image needs a Docker engine or buildah (apt-get install buildah)" >&2
        exit 1
    fi
fi
for target in "${targets[@]}"; do
    started=$(date +%s.%N)
    # shellcheck disable=SC2206  # IMAGE_BUILD_FLAGS is a list of flags
    args=(${IMAGE_BUILD_FLAGS:-} --target "$target" --build-arg "BASE_IMAGE=$base" --build-arg "RUN_AS=${RUN_AS:-app}" -t "$image:$target")
    if [ "$IMAGE_BUILDER" = docker ]; then
        DOCKER_BUILDKIT=1 docker build --quiet "${args[@]}" . >/dev/null
        size=$(docker image inspect --format '{{.Size}}' "$image:$target")
    else
        # --isolation chroot: no user namespaces or cgroups needed (this works as root in a container too).
        # --pull=false: a localhost/ base is used as it is; a registry base is pulled when it is missing.
        # --layers: each step is cached, as Docker does; a rebuild redoes only what follows a changed input.
        buildah bud --quiet --format docker --isolation chroot --pull=false --layers "${args[@]}" . >/dev/null
        size=$(buildah inspect --type image --format '{{.ImageAnnotations}}' "$image:$target" >/dev/null \
            && podman image inspect --format '{{.Size}}' "localhost/$image:$target")
    fi
    echo "$image:$target built with $IMAGE_BUILDER from $base in $(python3 -c "print(round($(date +%s.%N) - $started, 1))") s:" \
        "$(python3 -c "print(round($size / 1e6))") MB uncompressed"
done
