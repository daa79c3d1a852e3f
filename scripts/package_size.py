"""Print the Lambda package's sizes against Lambda's limits; exit 1 if a limit is broken.

    python scripts/package_size.py HANDLER_ZIP PROJECT_TAR_GZ EPHEMERAL_MB
    python scripts/package_size.py FUNCTION_ZIP

With Zappa's slim_handler the function's own package is the small handler zip (limit: 250 MiB
unzipped); the project and its libraries are a tar.gz on S3 that the handler unpacks into /tmp at a
cold start (limit: the function's ephemeral storage, less room for the model cache). Without
slim_handler (the compiled-only stage) the one zip holds everything and must fit the 250 MiB itself.
"""

from __future__ import annotations

import os
import sys
import tarfile
import zipfile
from collections import Counter

LAMBDA_UNZIPPED_LIMIT = 250 * 2**20
MODEL_CACHE_ROOM = 100 * 2**20


def mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def main() -> int:
    handler = sys.argv[1]
    with zipfile.ZipFile(handler) as archive:
        infos = archive.infolist()
    handler_unzipped = sum(info.file_size for info in infos)
    if len(sys.argv) == 2:
        return function_zip(handler, infos, handler_unzipped)
    project, ephemeral_mb = sys.argv[2], int(sys.argv[3])
    with tarfile.open(project) as archive:
        members = archive.getmembers()
    project_unpacked = sum(m.size for m in members)
    biggest = Counter()
    for member in members:
        biggest[member.name.split("/")[0]] += member.size
    tmp_limit = ephemeral_mb * 2**20 - MODEL_CACHE_ROOM
    print(f"handler zip  {handler}: {mib(os.path.getsize(handler))} zipped, {mib(handler_unzipped)} unzipped "
          f"(Lambda limit {mib(LAMBDA_UNZIPPED_LIMIT)} unzipped)")  # fmt: skip
    print(f"project      {project}: {mib(os.path.getsize(project))} compressed, {mib(project_unpacked)} unpacked "
          f"into /tmp (ephemeral storage {ephemeral_mb} MB, less {mib(MODEL_CACHE_ROOM)} for the model cache)")  # fmt: skip
    print("largest parts: " + ", ".join(f"{name} {mib(size)}" for name, size in biggest.most_common(6)))
    ok = handler_unzipped <= LAMBDA_UNZIPPED_LIMIT and project_unpacked <= tmp_limit
    print("within the limits" if ok else "OVER A LIMIT")
    return 0 if ok else 1


def function_zip(path: str, infos: list, unzipped: int) -> int:
    """One zip that is the whole function (no slim_handler): its unzipped size against Lambda's limit."""
    biggest = Counter()
    for info in infos:
        biggest[info.filename.split("/")[0]] += info.file_size
    print(f"function zip {path}: {mib(os.path.getsize(path))} zipped, {mib(unzipped)} unzipped "
          f"(Lambda limit {mib(LAMBDA_UNZIPPED_LIMIT)} unzipped)")  # fmt: skip
    print("largest parts: " + ", ".join(f"{name} {mib(size)}" for name, size in biggest.most_common(8)))
    ok = unzipped <= LAMBDA_UNZIPPED_LIMIT
    print("within the limits" if ok else "OVER A LIMIT")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
