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
from typing import Any, Protocol

import torch

from autocpu.accuracy import AccuracyReport, Tolerance
from autocpu.backends import Backend, BuildContext, Runner, get_backend
from autocpu.backends.base import quiet_build_logs
from autocpu.errors import one_line
from autocpu.finals import Finals, run_finals
from autocpu.inputs import sequence_length
from autocpu.measure import measure
from autocpu.models import ModelSpec
from autocpu.records import FAILED, INACCURATE, OK, TrialRecord
from autocpu.workloads import Workload

log = logging.getLogger(__name__)

#: Built candidates kept per runner: trials that differ only in runtime knobs reuse them.
BUILD_CACHE_SIZE = 3


class Executor(Protocol):
    """Where trials and the finals run: in this process or in worker processes."""

    mode: str

    def run(self, record: TrialRecord, give_up_above_ms: float | None = None) -> TrialRecord:
        """Build, check and measure ``record``'s candidate; every failure is in the record."""
        ...

    def finals(self, candidates: list[TrialRecord]) -> Finals:
        """:func:`autocpu.finals.run_finals` over these candidates, fastest first."""
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

    def finals(self, candidates: list[TrialRecord]) -> Finals:
        return run_finals(self, candidates)
