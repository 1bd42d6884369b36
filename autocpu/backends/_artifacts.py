"""Built files kept on disk: one folder per variant, made once, atomically, keyed by versions.

Backends that export or convert the model (ONNX Runtime, OpenVINO, llama.cpp) keep what they
make under the cache's artifact folder, named by a hash of the package versions that made it,
so files from other versions are never reused. A variant folder counts as built only once its
completion marker is written, and it is renamed into place after that, so a crash never leaves a
folder that looks complete; a deleted folder is simply made again.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from autocpu.errors import AutocpuError
from autocpu.hashing import stable_hash
from autocpu.plans import package_versions

#: Present in a variant folder only once everything in it has been written.
COMPLETE_MARKER = ".autocpu-complete"


def versions_hash(dists: Iterable[str]) -> str:
    """Short hash of installed versions: built files from other versions are never reused."""
    return stable_hash(package_versions(sorted(set(dists))), 10)


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def check_complete(folder: Path) -> None:
    """Fail clearly when a cached build's folder was deleted since (build() remakes it)."""
    if not is_complete(folder):
        raise AutocpuError(
            f"the built files in {folder} are gone or incomplete",
            "build the candidate again (deleting artifacts is safe: build() remakes them)",
        )


def ensure_variant(target: Path, make: Callable[[Path], None], **info: Any) -> None:
    """Make ``target`` with ``make(tmp)`` unless a complete copy exists.

    ``make`` writes into a temporary sibling that is renamed into place after the marker is
    written. A file lock keeps two processes from making the same variant at once. The marker
    holds ``info`` and how many seconds ``make`` took, for whoever inspects the cache.
    """
    from filelock import FileLock

    if is_complete(target):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.with_name(f".{target.name}.lock"))):
        if is_complete(target):
            return
        if target.exists():
            shutil.rmtree(target)  # left over from an interrupted build
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            started = time.perf_counter()
            make(tmp)
            info = {**info, "seconds": round(time.perf_counter() - started, 3)}
            (tmp / COMPLETE_MARKER).write_text(json.dumps(info, sort_keys=True, default=str))
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
