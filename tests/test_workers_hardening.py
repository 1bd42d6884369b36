"""Workers die with the tuner that started them and leave no folder behind, however it ends."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

TESTS = str(Path(__file__).parent)

#: A tuner whose only candidate hangs: its worker would run for an hour. It survives a Ctrl-C.
#: Python raises KeyboardInterrupt on SIGINT only if SIGINT was not ignored when it started, and
#: a shell starts background jobs with SIGINT ignored: the tuner takes Python's handler itself, so
#: the test holds however the suite was launched.
TUNER = """
import signal
import time
from conftest import tiny_inputs, tiny_model
import autocpu
signal.signal(signal.SIGINT, signal.default_int_handler)
try:
    autocpu.tune(tiny_model("bert"), tiny_inputs("bert"), n_trials=1, backends=["test_hang"],
                 trial_timeout=600)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def tuner(cache_dir):
    """A tuner process running a hung trial in a worker, and that worker's processes."""
    path = os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])
    env = {
        **os.environ,
        "AUTOCPU_EXTRA_BACKENDS": "misbehaving_backends:HangBackend",
        "PYTHONPATH": path,
        "PYTHONUNBUFFERED": "1",
    }
    process = subprocess.Popen(
        [sys.executable, "-c", TUNER], env=env, stdout=subprocess.PIPE, text=True
    )
    workers: list[psutil.Process] = []
    try:
        workers.extend(hung_workers(process.pid))
        yield process, workers
    finally:
        process.kill()
        process.wait()
        for worker in workers:
            with contextlib.suppress(psutil.Error):
                worker.kill()


def hung_workers(tuner_pid: int, wait_s: float = 300) -> list[psutil.Process]:
    """The processes of the worker measuring test_hang (not the baseline's), once it runs."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        with contextlib.suppress(psutil.Error, OSError):  # a worker that just ended
            found = [
                p
                for p in psutil.Process(tuner_pid).children(recursive=True)
                if "autocpu.isolation" in " ".join(p.cmdline())
                and b"test_hang" in Path(p.cmdline()[-2]).read_bytes()
            ]
            if found:
                time.sleep(2)  # past the worker's start-up: in the hung build
                return [found[0], *found[0].children(recursive=True)]
        time.sleep(0.2)
    raise AssertionError("the test_hang worker never started")


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE  # dead, its parent not reaping
    except psutil.NoSuchProcess:
        return True


def wait_until(condition, timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_a_killed_tuner_takes_its_hung_worker_and_the_worker_folder_along(tuner):
    process, workers = tuner
    folder = Path(workers[0].cmdline()[-2]).parent
    assert folder.name.startswith("autocpu-worker-") and folder.exists()
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert wait_until(lambda: all(gone(w) for w in workers)), [w.pid for w in workers]
    assert wait_until(lambda: not folder.exists()), sorted(folder.iterdir())


def test_an_interrupt_the_tuner_survives_kills_its_worker(tuner):
    process, workers = tuner
    folder = Path(workers[0].cmdline()[-2]).parent
    os.kill(process.pid, signal.SIGINT)  # Ctrl-C, caught: this tuner lives on
    assert process.stdout.readline().strip() == "interrupted"
    assert wait_until(lambda: all(gone(w) for w in workers)), [w.pid for w in workers]
    assert not folder.exists()
    assert process.poll() is None
