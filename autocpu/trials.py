"""Building, checking and measuring one candidate in this process.

:class:`TrialRunner` is the in-process :class:`Executor`; worker processes run one too. It holds
only the model spec, the workload and its reference outputs, so it can be rebuilt in a worker.
"""

from __future__ import annotations

import collections
import logging
import time
import traceback
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import torch

from autocpu.accuracy import AccuracyReport, Tolerance
from autocpu.backends import Backend, BuildContext, Runner, get_backend
from autocpu.backends.base import quiet_build_logs
from autocpu.errors import one_line
from autocpu.finals import WARMUP_CALLS, FinalsError, contender_name
from autocpu.inputs import sequence_length
from autocpu.measure import local_turn, measure, warm_up
from autocpu.models import ModelSpec
from autocpu.records import FAILED, INACCURATE, OK, GenerationStats, TrialRecord
from autocpu.workloads import Workload

if TYPE_CHECKING:
    from autocpu.finals import Contender

log = logging.getLogger(__name__)

#: Built candidates kept per runner: trials that differ only in runtime knobs reuse them.
BUILD_CACHE_SIZE = 3


class Executor(Protocol):
    """Where trials and the finals' contenders run: in this process or in worker processes."""

    mode: str
    workload: Workload

    def run(self, record: TrialRecord, give_up_above_ms: float | None = None) -> TrialRecord:
        """Build, check and measure ``record``'s candidate; every failure is in the record."""
        ...

    def contender(self, record: TrialRecord | None) -> Contender:
        """``record``'s engine (None: the baseline) built and warm for the finals."""
        ...


class TrialRunner:
    """Build, check and measure candidates in this process (an :class:`Executor`).

    Builds are cached (LRU) by their non-runtime parameters, so trials that differ only in
    threads reuse the expensive part.
    """

    mode = "in-process"

    def __init__(
        self,
        spec: ModelSpec,
        workload: Workload,
        references: list[Any],
        tolerance: Tolerance,
        ctx: BuildContext,
    ) -> None:
        self.spec = spec
        self.workload = workload
        self.references = references
        self.tolerance = tolerance
        self.ctx = ctx
        self.default_threads = torch.get_num_threads()
        self._builds: collections.OrderedDict[tuple, Any] = collections.OrderedDict()

    def runner(self, backend: Backend, params: Mapping[str, Any]) -> tuple[Runner, float]:
        """The bound runner and the seconds its build took (0 when cached)."""
        key = backend.build_key(params)
        with quiet_build_logs():
            if key in self._builds:
                self._builds.move_to_end(key)
                return backend.bind(self._builds[key], params), 0.0
            started = time.perf_counter()
            built = backend.build(self.spec, params, self.ctx)
            build_s = time.perf_counter() - started
            self._builds[key] = built
            while len(self._builds) > BUILD_CACHE_SIZE:
                self._builds.popitem(last=False)
            return backend.bind(built, params), build_s

    def run(self, record: TrialRecord, give_up_above_ms: float | None = None) -> TrialRecord:
        try:
            runner, record.build_s = self.runner(get_backend(record.backend), record.params)
            started = time.perf_counter()
            outputs = self.workload.run(runner)
            record.first_call_s = time.perf_counter() - started
            record.accuracy = self.workload.compare(self.references, outputs, self.tolerance)
            if not record.accuracy.passed:
                return record.fail(INACCURATE, "; ".join(record.accuracy.failures[:3]))
            record.latency = measure(self.workload.timed(runner), give_up_above_ms=give_up_above_ms)
            record.status = OK
            if record.latency.stopped_early:
                record.reason = f"stopped early: over {give_up_above_ms:.1f} ms"
            else:
                record.generation = self.workload.generation_stats(runner)
        except Exception as error:  # a backend that crashes must not end the search
            log.debug("trial %s failed:\n%s", record.backend, traceback.format_exc())
            record.fail(FAILED, one_line(error))
        finally:
            torch.set_num_threads(self.default_threads)
        return record

    def check_second_length(self, record: TrialRecord) -> AccuracyReport | None:
        """Re-check a candidate at another sequence length (catches shape-baked graphs)."""
        other = self.workload.at_second_length()
        if other is None:
            return None
        references = other.references(self.spec.model)
        runner, _ = self.runner(get_backend(record.backend), record.params)
        try:
            outputs = other.run(runner)
        finally:
            torch.set_num_threads(self.default_threads)
        report = other.compare(references, outputs, self.tolerance)
        if not report.passed:
            report.failures.insert(0, f"at sequence length {sequence_length(other.batches[0])}")
        return report

    def baseline_runner(self) -> Runner:
        """The user's model exactly as given, at torch's default thread count."""
        return Runner(self.spec.model, threads=self.default_threads)

    def contender(self, record: TrialRecord | None) -> InProcessContender:
        return InProcessContender(self, record)


class InProcessContender:
    """A finals contender built and timed in this process (a :class:`Contender`), next to the
    other contenders: their runtimes' thread pools and caches disturb its timings, which is why
    tunes run each contender in a worker of its own (that worker holds one of these)."""

    def __init__(self, trial_runner: TrialRunner, record: TrialRecord | None) -> None:
        self.trial_runner, self.record = trial_runner, record
        workload = trial_runner.workload
        try:
            if record is None:
                self.runner = trial_runner.baseline_runner()
            else:
                self.runner, _ = trial_runner.runner(get_backend(record.backend), record.params)
            timed = workload.timed(self.runner)
            warm_up(timed, WARMUP_CALLS)
        except Exception as error:
            name = contender_name(record)
            raise FinalsError(
                f"{name} could not be built for the finals: {one_line(error)}"
            ) from error
        finally:
            torch.set_num_threads(trial_runner.default_threads)
        self._turn = local_turn(timed)

    def check_second_length(self) -> AccuracyReport | None:
        return None if self.record is None else self.trial_runner.check_second_length(self.record)

    def turn(self, settle_calls: int) -> float:
        return self._turn(settle_calls)

    def generation_stats(self) -> GenerationStats | None:
        return self.trial_runner.workload.generation_stats(self.runner)

    def close(self) -> None:
        """Give torch its default threads back (each runner sets its own on every call, so
        turns need not, and a worker's one engine keeps its threads from turn to turn)."""
        torch.set_num_threads(self.trial_runner.default_threads)
