"""Add compiled bytecode to the slim handler's project archive, so a cold start does not compile it.

    .venv-lambda/bin/python scripts/precompile_project.py dist/lambda-production-project.tar.gz

Run with Lambda's Python (3.12): the .pyc files are version-bound. Zappa's own .pyc files are useless
on Lambda (it resets file times, so they never match), and /var/task and the unpacked project would
otherwise be compiled at every cold start. "unchecked-hash" .pyc files are used without looking at
the source's time. Measured on the handler tests: cold start 12.4-13.3 s without, 7.7-10.6 s with.
"""

from __future__ import annotations

import compileall
import os
import sys
import tarfile
import tempfile
from pathlib import Path
from py_compile import PycInvalidationMode


def main() -> int:
    archive = Path(sys.argv[1])
    if sys.version_info[:2] != (3, 12):
        print("run this with Python 3.12, Lambda's runtime", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as folder:
        with tarfile.open(archive) as source:
            source.extractall(folder, filter="tar")
        ok = compileall.compile_dir(folder, quiet=2, workers=os.cpu_count() or 1,
                                    invalidation_mode=PycInvalidationMode.UNCHECKED_HASH)  # fmt: skip
        staging = archive.with_suffix(".tmp")
        with tarfile.open(staging, "w:gz") as target:
            for entry in sorted(os.listdir(folder)):
                target.add(os.path.join(folder, entry), arcname=entry)
        staging.replace(archive)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
