#!/usr/bin/env bash
# A base image from Debian's own packages, for machines that reach no container registry (`make image-base`):
# Debian bookworm's Essential packages with Python 3.11 (python3, python3-venv), CA certificates, tzdata and libstdc++
# (numpy and ONNX Runtime need it), as localhost/debian-python:bookworm. Then
# `make image BASE_IMAGE=localhost/debian-python:bookworm`.
# The variant is `essential`: no apt inside (the Dockerfile installs nothing from Debian), 17 MB less
# than `minbase`; the packages are installed with this machine's apt.
#
# The root filesystem tarball is kept in build/image-base/ (made once, ~2 minutes), and imported into the
# container storage (podman import; a few seconds) whenever the image is missing there. Needs root and the
# Debian packages mmdebstrap and podman. Docs, man pages and locales are left out; usrmerge is not
# installed (the hook makes the merged /usr itself), so perl does not come with it.
set -euo pipefail
cd "$(dirname "$0")/.."
image=${LOCAL_BASE_IMAGE:-localhost/debian-python:bookworm}
suite=${DEBIAN_SUITE:-bookworm}
tarball=build/image-base/debian-python-$suite.tar

if [ ! -s "$tarball" ]; then
    command -v mmdebstrap >/dev/null || { echo "image-base needs mmdebstrap (apt-get install mmdebstrap)" >&2; exit 1; }
    mkdir -p build/image-base
    mmdebstrap --quiet --variant=essential --include=python3,python3-venv,ca-certificates,libstdc++6,tzdata \
        --aptopt='APT::Install-Recommends "false"' \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*' \
        --format=tar "$suite" "$tarball.partial" >build/image-base/mmdebstrap.log 2>&1 \
        || { tail -20 build/image-base/mmdebstrap.log >&2; exit 1; }
    mv "$tarball.partial" "$tarball"
fi
if [ -n "$(podman images --quiet "$image" 2>/dev/null)" ] && [ ! "$tarball" -nt build/image-base/.imported ]; then
    echo "$image is in the container storage ($(podman images --format '{{.Size}}' "$image"))"
    exit 0
fi
podman import --quiet --change 'CMD ["python3"]' "$tarball" "$image" >/dev/null
touch build/image-base/.imported
echo "$image imported from $tarball ($(podman images --format '{{.Size}}' "$image"))"
