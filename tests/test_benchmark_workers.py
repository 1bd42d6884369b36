"""The benchmarks' warm column processes: each column in a process of its own, taking turns,
and failures that come back as one line."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from autocpu.measure import MAX_IDLE_WAIT_S, alternate

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.warm import Engine, Recipe, close_all, start_all  # noqa: E402

#: The served objects' module, importable in the column's process.
SERVED = {"PYTHONPATH": str(ROOT / "tests")}


def recipe(name: str, function: str = "NotesItsProcess", **kwargs: object) -> Recipe:
    return Recipe(name, "warm_served", function, kwargs, threads=1, env=SERVED)


def test_each_column_is_served_by_a_warm_process_of_its_own():
    engines = start_all([recipe("a", seconds=0.002), recipe("b", seconds=0.001)], print)
    try:
        pids = {name: engine.ask("pid") for name, engine in engines.items()}
        comparison = alternate(
            {name: engine.turn for name, engine in engines.items()},
            "a",
            min_rounds=3,
            max_rounds=3,
            max_time_s=0.0,
            settle_calls=0,
        )
        again = {name: engine.ask("pid") for name, engine in engines.items()}
        doubled = engines["a"].ask("doubled", torch.arange(3.0))  # tensors go both ways
    finally:
        close_all(engines)
    assert len({*pids.values(), os.getpid()}) == 3 and again == pids  # kept warm, not restarted
    assert doubled.tolist() == [0.0, 2.0, 4.0]
    assert comparison.rounds == 3 and comparison.speedup["b"] == pytest.approx(2.0)
    for engine in engines.values():
        assert engine.process.poll() is not None and not Path(engine._folder.name).exists()


def test_a_column_that_fails_to_build_says_so_in_one_line():
    with pytest.raises(RuntimeError, match=r"^broken could not be built: ValueError: no such"):
        Engine(recipe("broken", "fails_to_build"))


def test_a_column_that_fails_or_crashes_says_so_in_one_line():
    engine = Engine(recipe("flaky", seconds=0.001))
    try:
        with pytest.raises(RuntimeError) as refused:
            engine.ask("refuse")
        assert str(refused.value) == (
            "flaky failed in its worker: ValueError: this engine cannot do that"
        )
        assert engine.turn(0) == pytest.approx(0.001)  # a refusal leaves it serving
        with pytest.raises(RuntimeError, match=r"^flaky crashed: .*code 3.*\(about to crash\)$"):
            engine.ask("crash")
    finally:
        engine.close()


def test_a_process_answers_only_once_its_own_threads_are_idle():
    """A runtime's pool spinning on after a call must not run into the next process's turn."""
    engine = Engine(recipe("spins", seconds=0.001))
    try:
        worker = psutil.Process(engine.process.pid)
        engine.ask("leave_a_thread_spinning", 0.3)
        answered = sum(worker.cpu_times()[:2])
        time.sleep(0.4)
        after_the_answer = sum(worker.cpu_times()[:2]) - answered
        started = time.perf_counter()
        engine.ask("leave_a_thread_spinning", 60.0)  # a thread that never idles: waited out
        waited = time.perf_counter() - started
        assert engine.turn(0) == pytest.approx(0.001)
    finally:
        engine.close()
    assert after_the_answer < 0.05
    assert MAX_IDLE_WAIT_S <= waited < MAX_IDLE_WAIT_S + 1.0
