"""Trim an installed virtualenv for the image (Dockerfile): what no process of the service ever reads.

    python3 slim_venv.py VENV [--botocore-services s3,ssm,...]

Removed: the libraries' own test suites (`tests` folders, conftest.py), JavaScript source maps (Swagger
UI's), uv's notes (uv_cache.json), ONNX
Runtime's model-authoring tools (transformers, quantization, tools: never imported by `import onnxruntime`)
and, with --botocore-services, every AWS service description but those listed (the inference image talks to
S3 for artifacts, SSM and Secrets Manager for secrets, STS and SSO for credentials; boto3.client() for any
other service then fails with UnknownServiceError).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("venv", type=Path)
    parser.add_argument("--botocore-services", default="")
    args = parser.parse_args()
    (site,) = args.venv.glob("lib/python3*/site-packages")
    removed = []
    for folder in sorted(site.rglob("tests"), key=lambda p: len(p.parts)):
        if folder.is_dir():
            removed.append(folder)
            shutil.rmtree(folder)
    for name in ("transformers", "quantization", "tools"):
        folder = site / "onnxruntime" / name
        if folder.is_dir():
            removed.append(folder)
            shutil.rmtree(folder)
    # Source maps, pytest's conftest files, the installer's cache notes.
    for pattern in ("*.js.map", "conftest.py", "conftest.pyi", "*.dist-info/uv_cache.json"):
        for path in site.rglob(pattern):
            removed.append(path)
            path.unlink()
    keep = {name for name in args.botocore_services.split(",") if name}
    data = site / "botocore" / "data"
    if keep and data.is_dir():
        for folder in data.iterdir():
            if folder.is_dir() and folder.name not in keep:
                removed.append(folder)
                shutil.rmtree(folder)
    print(f"slim_venv: removed {len(removed)} folders and files from {args.venv}")


if __name__ == "__main__":
    main()
