"""Other work on the machine, on purpose: busy-loop processes outside the caller's process tree,
as a load the measurement must see (the protocol check's tune under load, the load tests)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

#: Starts a busy loop that is not this process's child (the process that starts it exits at
#: once), so a load meter counts it as other work, and prints its pid.
_DETACHED_HOG = (
    "import subprocess, sys; "
    "print(subprocess.Popen([sys.executable, '-c', 'while True: pass'], "
    "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True).pid)"
)


@contextlib.contextmanager
def busy_loops(count: int) -> Iterator[None]:
    """``count`` busy-loop processes outside this process tree while the block runs."""
    pids = []
    try:
        for _ in range(count):
            started = subprocess.run(
                [sys.executable, "-c", _DETACHED_HOG], capture_output=True, text=True, check=True
            )
            pids.append(int(started.stdout))
        time.sleep(0.3)
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
