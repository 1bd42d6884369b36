"""Test-only backends that fail the way native code fails (a segfault, an abort, a hang and a
memory blow-up), one that makes concurrent tunes meet, and two that note where they run. Loaded through
AUTOCPU_EXTRA_BACKENDS, never shipped in autocpu/backends."""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path
from typing import Any

from autocpu.backends.base import Availability, Backend
from autocpu.backends.eager import EagerBackend


class _Misbehaving(Backend):
    simplicity = 9
    description = "test only"

    def availability(self, spec: Any, hw: Any) -> Availability:
        return Availability.yes()

    def defaults(self, hw: Any) -> dict[str, Any]:
        return {}

    def suggest(self, trial: Any, spec: Any, hw: Any, **admitted: bool) -> dict[str, Any]:
        return {}


class SegfaultBackend(_Misbehaving):
    name = "test_segfault"

    def build(self, spec: Any, params: Any, ctx: Any) -> Any:
        return ctypes.string_at(0)  # null read: SIGSEGV


class AbortBackend(_Misbehaving):
    name = "test_abort"

    def build(self, spec: Any, params: Any, ctx: Any) -> Any:
        os.abort()


class HangBackend(_Misbehaving):
    name = "test_hang"

    def build(self, spec: Any, params: Any, ctx: Any) -> Any:
        time.sleep(3600)


class MemoryHogBackend(_Misbehaving):
    name = "test_memory_hog"

    def build(self, spec: Any, params: Any, ctx: Any) -> Any:
        hog = []
        for _ in range(64):  # up to 4 GiB, touched so it is resident
            hog.append(bytearray(64 * 2**20))
            time.sleep(0.02)
        return hog


class BarrierBackend(EagerBackend):
    """Eager, except that each process's first build waits until ``parties`` processes are
    building: concurrent tunes then provably each measure a trial, however their start
    times fall. The meeting place is the folder in AUTOCPU_TEST_BARRIER."""

    name = "test_barrier"
    parties = 2
    _met = False

    def build(self, spec: Any, params: Any, ctx: Any) -> Any:
        if not BarrierBackend._met:
            folder = Path(os.environ["AUTOCPU_TEST_BARRIER"])
            (folder / str(os.getpid())).touch()
            deadline = time.monotonic() + 300
            while len(list(folder.iterdir())) < self.parties and time.monotonic() < deadline:
                time.sleep(0.05)
            BarrierBackend._met = True
        return super().build(spec, params, ctx)


class CallNotingBackend(EagerBackend):
    """Eager at its own settings, noting the process of each call: a file ``NAME-PID`` in the
    folder in AUTOCPU_TEST_CALLS."""

    name = "test_calls_a"
    simplicity = 9

    def defaults(self, hw: Any) -> dict[str, Any]:
        return {}

    def lossy_defaults(self, spec: Any, hw: Any) -> list[dict[str, Any]]:
        return []

    def suggest(self, trial: Any, spec: Any, hw: Any, **admitted: bool) -> dict[str, Any]:
        return {}

    def build(self, spec: Any, params: Any, ctx: Any) -> Any:
        module = super().build(spec, params, ctx)
        mark = Path(os.environ["AUTOCPU_TEST_CALLS"]) / f"{self.name}-{os.getpid()}"

        def noted(**inputs: Any) -> Any:
            mark.touch()
            return module(**inputs)

        return noted


class OtherCallNotingBackend(CallNotingBackend):
    name = "test_calls_b"


class FinalsCrashBackend(CallNotingBackend):
    """Builds in its trial, segfaults when built in a finals worker (which has a channel)."""

    name = "test_finals_crash"

    def build(self, spec: Any, params: Any, ctx: Any) -> Any:
        if "AUTOCPU_WORKER_CHANNEL" in os.environ:
            ctypes.string_at(0)
        return super().build(spec, params, ctx)


class RoundsCrashBackend(CallNotingBackend):
    """Segfaults on its CRASH_AT-th call in a finals worker: past its warm-up and its check at a
    second length (at most 23 calls), during the rounds."""

    name = "test_rounds_crash"
    CRASH_AT = 40

    def build(self, spec: Any, params: Any, ctx: Any) -> Any:
        module = super().build(spec, params, ctx)
        if "AUTOCPU_WORKER_CHANNEL" not in os.environ:
            return module
        calls = 0

        def counted(**inputs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == self.CRASH_AT:
                ctypes.string_at(0)
            return module(**inputs)

        return counted


FINALS_CRASH = "misbehaving_backends:FinalsCrashBackend"
ROUNDS_CRASH = "misbehaving_backends:RoundsCrashBackend"
CALL_NOTING = "misbehaving_backends:CallNotingBackend,misbehaving_backends:OtherCallNotingBackend"
BARRIER = "misbehaving_backends:BarrierBackend"
ALL = (
    "misbehaving_backends:SegfaultBackend,misbehaving_backends:AbortBackend,"
    "misbehaving_backends:HangBackend,misbehaving_backends:MemoryHogBackend"
)
