"""Test-only backends that fail the way native code fails: a segfault, an abort, a hang and a
memory blow-up. Loaded through AUTOCPU_EXTRA_BACKENDS, never shipped in autocpu/backends."""

from __future__ import annotations

import ctypes
import os
import time
from typing import Any

from autocpu.backends.base import Availability, Backend


class _Misbehaving(Backend):
    simplicity = 9
    description = "test only"

    def availability(self, spec: Any, hw: Any) -> Availability:
        return Availability.yes()

    def defaults(self, hw: Any) -> dict[str, Any]:
        return {}

    def suggest(self, trial: Any, spec: Any, hw: Any, *, lossy: bool = True) -> dict[str, Any]:
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


ALL = (
    "misbehaving_backends:SegfaultBackend,misbehaving_backends:AbortBackend,"
    "misbehaving_backends:HangBackend,misbehaving_backends:MemoryHogBackend"
)
