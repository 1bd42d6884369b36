"""Every benchmark column in a warm process of its own, as a deployment runs one engine per
process and as autocpu's finals time their contenders.

A column's process is started with its :class:`Recipe` (a function of a benchmarks module and
its arguments, which builds the served object there), builds it once, warms it up and then
answers requests: ``turn`` for the alternating rounds, the rest (its output, its figures) as the
served object defines them. While one column takes its turn the others wait on their sockets,
so no column's runtime (thread pools that spin after a call, OpenMP barriers, caches) disturbs
another's timings.

    python -m benchmarks.warm JOB      # how a column's process is started; not run by hand
"""

from __future__ import annotations

import functools
import importlib
import os
import pickle
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from autocpu.finals import WARMUP_CALLS
from autocpu.isolation import (
    CHANNEL_ENV,
    WarmProcess,
    answer_requests,
    channel_to_parent,
    thread_env,
)
from autocpu.measure import Comparison, Turn, alternate, local_turn, warm_up

ROOT = Path(__file__).resolve().parent.parent
#: Seconds a column's process may take for one request, its build (an export, a compile) first.
REQUEST_TIMEOUT_S = 1800.0
#: The whole machine but a fifth: each column's process tree must stay under it.
MEMORY_SHARE = 0.8


@dataclass(frozen=True)
class Recipe:
    """How a column's process builds its served object: ``module.function(**kwargs)``.
    ``env`` is added to the process's environment, with torch's ``threads``."""

    name: str
    module: str
    function: str
    kwargs: Mapping[str, Any]
    threads: int
    env: Mapping[str, str] = field(default_factory=dict)


class Engine(WarmProcess):
    """One column, built and warm in a process of its own; :meth:`turn` is its turn in the
    rounds and :meth:`ask` reaches the rest of its served object."""

    def __init__(self, recipe: Recipe) -> None:
        memory = int(psutil.virtual_memory().total * MEMORY_SHARE)
        super().__init__(recipe.name, functools.partial(_start, recipe), REQUEST_TIMEOUT_S, memory)

    def turn(self, settle_calls: int) -> float:
        return self.ask("turn", settle_calls)


def _start(recipe: Recipe, folder: Path, channel: int) -> subprocess.Popen:
    job = folder / "job"
    job.write_bytes(pickle.dumps(recipe))
    env = {**os.environ, **recipe.env, **thread_env(recipe.threads), CHANNEL_ENV: str(channel)}
    with open(folder / "log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "benchmarks.warm", str(job)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # a Ctrl-C reaches the suite, which closes its columns
            pass_fds=(channel,),
        )


def start_all(recipes: list[Recipe], say: Callable[[str], None]) -> dict[str, Engine]:
    """Every recipe's process, started and built one after another (builds compete for the
    CPUs otherwise, and their one-time costs are part of the results)."""
    engines: dict[str, Engine] = {}
    try:
        for recipe in recipes:
            say(f"  building {recipe.name} in a process of its own")
            engines[recipe.name] = Engine(recipe)
    except BaseException:
        close_all(engines)
        raise
    return engines


def close_all(engines: Mapping[str, Engine]) -> None:
    for engine in engines.values():
        engine.close()


def warm_turn(timed: Callable[[], object]) -> Turn:
    """A served column's turn: ``timed`` (one call of its workload) warmed up, then taken."""
    warm_up(timed, WARMUP_CALLS)
    return local_turn(timed)


@dataclass
class Measured:
    """The columns' descriptions (each served object's ``described()``, fp32 eager first), their
    alternating rounds, and each runnable column's answer to the follow-up request."""

    columns: list[Any]
    comparison: Comparison
    answers: dict[str, Any]


def measure_columns(
    recipes: list[Recipe], say: Callable[[str], None], follow_up: tuple, **rounds: Any
) -> Measured:
    """Start every column's process, time the runnable ones (those built without an error) in
    alternating turns against the first (``rounds``: :func:`autocpu.measure.alternate`'s caps),
    ask each of them ``follow_up`` (a request and its arguments), and close them all."""
    engines = start_all(recipes, say)
    try:
        columns = [engine.ask("described") for engine in engines.values()]
        runnable = [column.name for column in columns if not column.error]
        say(f"  measuring {len(runnable)} columns, a warm process each, in alternating turns")
        turns = {name: engines[name].turn for name in runnable}
        comparison = alternate(turns, recipes[0].name, **rounds)
        answers = {name: engines[name].ask(*follow_up) for name in runnable}
    finally:
        close_all(engines)
    return Measured(columns, comparison, answers)


def main(job: str) -> None:
    recipe: Recipe = pickle.loads(Path(job).read_bytes())
    function = getattr(importlib.import_module(recipe.module), recipe.function)
    answer_requests(functools.partial(function, **recipe.kwargs), recipe.name, channel_to_parent())


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: some runtimes crash in their atexit handlers
