"""What benchmarks.warm's tests serve: objects built in a column's process of their own that say
which process they run in, and recipes that fail the ways a column's build or run can fail."""

from __future__ import annotations

import os
import threading
import time

import torch


class NotesItsProcess:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def turn(self, settle_calls: int) -> float:
        return self.seconds * (settle_calls + 1)

    def pid(self) -> int:
        return os.getpid()

    def crash(self) -> None:
        print("about to crash", flush=True)
        os._exit(3)

    def doubled(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor * 2

    def leave_a_thread_spinning(self, seconds: float) -> None:
        """Return at once, leaving a thread that spins for ``seconds`` (as runtimes' pools do)."""
        threading.Thread(target=spin, args=(seconds,), daemon=True).start()

    def refuse(self) -> None:
        raise ValueError("this engine cannot do that\nsecond line")


def fails_to_build() -> NotesItsProcess:
    raise ValueError("no such engine")


def spin(seconds: float) -> None:
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass
