"""The search: the bf16/int8 recipes first when the tolerance admits them, then every eligible
backend's defaults, then Optuna's TPE under the accuracy constraint, then the finalists re-checked
at a second sequence length and re-measured against the baseline interleaved. The fastest that
beats the baseline beyond noise wins; ties within noise go to the simpler plan.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import optuna
import torch

from autocpu.accuracy import AccuracyReport, Tolerance, compare_batches
from autocpu.backends import Backend, BuildContext, Runner, get_backend
from autocpu.backends.base import quiet_build_logs
from autocpu.hardware import CpuInfo
from autocpu.inputs import Batch, at_sequence_length, second_length
from autocpu.measure import Comparison, LatencyStats, interleaved, measure
from autocpu.models import ModelSpec

log = logging.getLogger(__name__)

#: Ratios closer than this are noise on a shared machine (GUIDE section 3).
NOISE = 0.03
#: A candidate whose median passes this multiple of the best so far stops being measured.
GIVE_UP_FACTOR = 1.5
FINALISTS = 3
#: A finalist must beat the baseline at this one-sided significance (signed-rank test).
ALPHA = 0.05
#: Random draws that look for a point no trial has measured, after the sampler proposed one that
#: was; when none turns up, the search space is taken as exhausted and the study stops.
FRESH_POINT_DRAWS = 200
BUILD_CACHE_SIZE = 3
#: How the study picks candidates: Optuna's TPE within a budget, or every point of the space
#: (Optuna's BruteForceSampler; the benchmark's oracle, and for users who can afford it).
SEARCH_STRATEGIES = ("tpe", "exhaustive")


def make_sampler(strategy: str, seed: int = 0) -> optuna.samplers.BaseSampler:
    if strategy == "exhaustive":
        with warnings.catch_warnings():  # experimental since Optuna 3.1, stable in use
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.BruteForceSampler(seed=seed)
    # constant_liar: machines sharing a study steer away from points others are measuring.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, constant_liar=True)


@dataclass
class TrialRecord:
    """One candidate's outcome, as ``explain()`` shows it."""

    backend: str
    params: dict[str, Any]
    status: str = "pending"  # ok | inaccurate | failed | ineligible
    number: int | None = None
    latency: dict[str, Any] | None = None
    accuracy: dict[str, Any] | None = None
    build_s: float | None = None
    first_call_s: float | None = None
    reason: str = ""
    speedup: float | None = None
    worker: str = ""

    @property
    def median_ms(self) -> float:
        return self.latency["median_ms"] if self.latency else float("inf")

    @property
    def identity(self) -> tuple:
        return (self.backend, tuple(sorted(self.params.items())))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrialRecord:
        return cls(**dict(data))


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def workload(runner: Callable[..., Any], batches: list[Batch]) -> Callable[[], list[Any]]:
    """One pass over the example batches: the unit every latency number refers to."""
    return lambda: [runner(**batch) for batch in batches]


class TrialRunner:
    """Build, check and measure candidates in this process (an :class:`Executor`).

    Holds only the model spec, the inputs and their reference outputs, so it can live in a
    worker process. Builds are cached (LRU) by their non-runtime parameters, so trials that
    differ only in threads reuse the expensive part.
    """

    def __init__(
        self,
        spec: ModelSpec,
        batches: list[Batch],
        references: list[Any],
        tolerance: Tolerance,
        ctx: BuildContext,
    ) -> None:
        self.spec = spec
        self.batches = batches
        self.references = references
        self.tolerance = tolerance
        self.ctx = ctx
        self.default_threads = torch.get_num_threads()
        self.mode = "in-process"
        self._builds: collections.OrderedDict[tuple, tuple[Any, float]] = collections.OrderedDict()

    def runner(self, backend: Backend, params: Mapping[str, Any]) -> tuple[Runner, float]:
        """The bound runner and the seconds its build took (0 when cached)."""
        key = backend.build_key(params)
        if key in self._builds:
            self._builds.move_to_end(key)
            built, _ = self._builds[key]
            with quiet_build_logs():
                return backend.bind(built, params), 0.0
        started = time.perf_counter()
        with quiet_build_logs():
            built = backend.build(self.spec, params, self.ctx)
            build_s = time.perf_counter() - started
            self._builds[key] = (built, build_s)
            while len(self._builds) > BUILD_CACHE_SIZE:
                self._builds.popitem(last=False)
            return backend.bind(built, params), build_s

    def run(self, record: TrialRecord, give_up_above_ms: float | None = None) -> TrialRecord:
        backend = get_backend(record.backend)
        try:
            runner, record.build_s = self.runner(backend, record.params)
            started = time.perf_counter()
            outputs = [runner(**batch) for batch in self.batches]
            record.first_call_s = time.perf_counter() - started
            report = compare_batches(self.references, outputs, self.tolerance, self.batches)
            record.accuracy = report.to_dict()
            if not report.passed:
                record.status = "inaccurate"
                record.reason = "; ".join(report.failures[:3])
                return record
            stats = measure(workload(runner, self.batches), give_up_above_ms=give_up_above_ms)
            record.latency = stats.to_dict()
            record.status = "ok"
            if stats.stopped_early:
                record.reason = f"stopped early: over {give_up_above_ms:.1f} ms"
        except Exception as error:  # a backend that crashes must not end the search
            record.status = "failed"
            record.reason = one_line(error)
            log.debug("trial %s failed:\n%s", record.backend, traceback.format_exc())
        finally:
            torch.set_num_threads(self.default_threads)
        return record

    def check_second_length(self, record: TrialRecord) -> AccuracyReport | None:
        """Re-check a candidate at another sequence length (catches shape-baked graphs)."""
        lengths = [second_length(b) for b in self.batches]
        if any(n is None for n in lengths):
            return None
        batches = [at_sequence_length(b, n) for b, n in zip(self.batches, lengths, strict=True)]
        with torch.inference_mode():
            references = [self.spec.model(**b) for b in batches]
        runner, _ = self.runner(get_backend(record.backend), record.params)
        try:
            outputs = [runner(**b) for b in batches]
        finally:
            torch.set_num_threads(self.default_threads)
        report = compare_batches(references, outputs, self.tolerance, batches)
        if not report.passed:
            report.failures.insert(0, f"at sequence length {lengths[0]}")
        return report

    def baseline_runner(self) -> Runner:
        """The user's model exactly as given, at torch's default thread count."""
        return Runner(self.spec.model, threads=self.default_threads)

    def finals(
        self, baseline: TrialRecord, candidates: list[TrialRecord]
    ) -> tuple[list[TrialRecord], Comparison]:
        """Check the fastest candidates at a second length (until FINALISTS pass), then
        re-measure the survivors against the baseline interleaved.

        Returns every candidate checked (failures carry their new status) and the comparison,
        in which the i-th surviving candidate is labelled ``candidate{i}``.
        """
        checked: list[TrialRecord] = []
        finalists: list[TrialRecord] = []
        for record in candidates:
            if len(finalists) == FINALISTS:
                break
            checked.append(record)
            try:
                report = self.check_second_length(record)
            except Exception as error:
                record.status, record.reason = "failed", f"at a second length: {one_line(error)}"
                continue
            if report is not None and not report.passed:
                record.status, record.reason = "inaccurate", "; ".join(report.failures[:3])
                continue
            finalists.append(record)
        workloads = {"baseline": workload(self.baseline_runner(), self.batches)}
        labels = {f"candidate{index}": record for index, record in enumerate(finalists)}
        for label, record in labels.items():
            runner, _ = self.runner(get_backend(record.backend), record.params)
            workloads[label] = workload(runner, self.batches)
        try:
            comparison = interleaved(
                workloads, "baseline", settled=lambda so_far: not undecided(labels, so_far)
            )
        finally:
            torch.set_num_threads(self.default_threads)
        for label, record in labels.items():
            record.speedup = comparison.speedup[label]
        return checked, comparison


def _preferred(names: Mapping[str, TrialRecord], speedup: Mapping[str, float]) -> tuple[str, str]:
    """The fastest finalist's label, and the simplest finalist within noise of it."""
    fastest = max(names, key=lambda label: speedup[label])
    ties = [label for label in names if speedup[label] >= speedup[fastest] * (1 - NOISE)]
    simplest = min(
        ties, key=lambda label: (get_backend(names[label].backend).simplicity, -speedup[label])
    )
    return fastest, simplest


def _proven(comparison: Comparison, label: str) -> bool:
    """Faster than the baseline beyond noise (median ratio) and beyond chance (signed rank)."""
    return comparison.speedup[label] >= 1 + NOISE and comparison.p_not_faster[label] <= ALPHA


def undecided(names: Mapping[str, TrialRecord], comparison: Comparison) -> bool:
    """Whether more interleaved rounds could still change the decision: the preferred finalist
    is ahead of the baseline beyond noise but not yet proven faster."""
    if not names:
        return False
    _, chosen = _preferred(names, comparison.speedup)
    return comparison.speedup[chosen] >= 1 + NOISE and not _proven(comparison, chosen)


def decide(names: Mapping[str, TrialRecord], comparison: Comparison) -> tuple[str, str]:
    """Fastest finalist; within noise of it, the simplest; it must beat the baseline beyond
    noise (median ratio) and beyond chance (signed-rank test over the rounds)."""
    if not names:
        return "baseline", "no candidate passed the accuracy gate: keeping the model as is"
    speedup = comparison.speedup
    fastest, chosen = _preferred(names, speedup)
    record = names[chosen]
    low, high = comparison.speedup_iqr[chosen]
    p_value = comparison.p_not_faster[chosen]
    p_text = "p<0.001" if p_value < 0.001 else f"p={p_value:.3f}"
    details = f"IQR {low:.2f}-{high:.2f}, {p_text} over {comparison.rounds} interleaved rounds"
    if not _proven(comparison, chosen):
        return "baseline", (
            f"no candidate beat the baseline beyond noise and chance (best: {record.backend} at "
            f"{speedup[chosen]:.2f}x, {details}): keeping the model as is"
        )
    why = f"{record.backend} won at {speedup[chosen]:.2f}x over the baseline ({details})"
    if chosen != fastest:
        why += (
            f"; {names[fastest].backend} measured {speedup[fastest]:.2f}x, a tie within "
            f"{NOISE:.0%} noise, and {record.backend} is simpler"
        )
    return chosen, why


@dataclass
class SearchResult:
    winner: TrialRecord
    baseline: LatencyStats
    winner_stats: LatencyStats
    speedup: float
    speedup_iqr: tuple[float, float]
    decision: str
    records: list[TrialRecord] = field(default_factory=list)
    study_trials: int = 0


@dataclass(frozen=True)
class ProgressEvent:
    """What a progress display needs: sent when a trial starts and when it ends."""

    record: TrialRecord
    started: bool  # True: the trial is about to run; False: it finished (see record.status)
    finished: int  # trials finished in the study so far (resumed and other machines' included)
    total: int | None  # the trial budget, None when only a timeout bounds the search
    failures: int
    baseline_ms: float
    best_ms: float

    @property
    def best_speedup(self) -> float:
        return self.baseline_ms / self.best_ms if self.best_ms > 0 else 1.0


ProgressCallback = Callable[[ProgressEvent], None]


class Executor(Protocol):
    """Where trials run: in this process (TrialRunner itself) or in worker processes."""

    mode: str

    def run(self, record: TrialRecord, give_up_above_ms: float | None = None) -> TrialRecord: ...

    def finals(
        self, baseline: TrialRecord, candidates: list[TrialRecord]
    ) -> tuple[list[TrialRecord], Comparison]: ...


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Search:
    """An Optuna study over the eligible backends, then the finalists' interleaved re-measure.

    The study may already hold trials (a resumed tune, or other machines sharing a storage):
    finished trials are reused, never repeated, and all of them end up in the plan. The trial
    budget counts measured candidates: when the sampler proposes a point already measured, the
    trial reuses its result (Optuna still learns from it) and a random unmeasured point is queued
    in its place, so ``n_trials=20`` measures 20 distinct candidates, or the whole space if smaller.
    """

    def __init__(
        self,
        executor: Executor,
        study: optuna.Study,
        spec: ModelSpec,
        backends: list[Backend],
        hw: CpuInfo,
        *,
        n_trials: int | None,
        timeout: float | None,
        progress: ProgressCallback | None = None,
        lossy: bool = True,
        seeds: list[tuple[str, dict[str, Any]]] = (),
    ) -> None:
        self.executor = executor
        self.lossy = lossy
        self.seeds = [
            (name, params) for name, params in seeds if name in {b.name for b in backends}
        ]
        self.study = study
        self.spec = spec
        self.backends = {b.name: b for b in backends}
        self.hw = hw
        self.n_trials = n_trials
        self.timeout = timeout
        self.progress = progress
        self.best_ms = float("inf")
        self.baseline_ms = float("inf")

    def baseline_record(self) -> TrialRecord:
        """The user's model exactly as given (fp32, its attention, torch's default threads)."""
        from autocpu.backends.eager import current_attention

        attention = current_attention(self.spec.model)
        return TrialRecord("eager", {"attention": attention, "precision": "fp32"})

    def run(self) -> SearchResult:
        baseline = self.executor.run(self.baseline_record())
        if baseline.status != "ok":
            raise RuntimeError(f"measuring the model as given failed: {baseline.reason}")
        baseline.reason = "baseline"
        self.best_ms = self.baseline_ms = baseline.median_ms
        log.info("baseline (the model as given): %.2f ms", baseline.median_ms)
        self._run_study()
        return self._finish(baseline)

    # Study ----------------------------------------------------------------------------------

    def records(self) -> list[TrialRecord]:
        """Every distinct candidate the study measured, from any process or earlier run."""
        found: dict[tuple, TrialRecord] = {}
        for trial in self.study.get_trials(deepcopy=False):
            data = trial.user_attrs.get("record")
            if data and "repeat_of" not in trial.user_attrs:
                record = TrialRecord.from_dict(data)
                found.setdefault(record.identity, record)
        return list(found.values())

    def _measured(self) -> int:
        """Finished trials that measured a candidate: repeats of a measured point, and trials
        killed mid-run (failed without a record; their point is queued again), excluded."""
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
        trials = self.study.get_trials(deepcopy=False, states=states)
        return sum("record" in t.user_attrs and "repeat_of" not in t.user_attrs for t in trials)

    def _enqueue(self, name: str, params: Mapping[str, Any]) -> None:
        backend = self.backends[name]
        self.study.enqueue_trial(
            {"backend": name, **{backend.key(k): v for k, v in params.items()}},
            skip_if_exists=True,
        )

    def _propose(self, trial: optuna.Trial) -> TrialRecord:
        name = trial.suggest_categorical("backend", list(self.backends))
        params = self.backends[name].suggest(trial, self.spec, self.hw, lossy=self.lossy)
        return TrialRecord(name, params, number=trial.number)

    def _enqueue_unmeasured(self, seed: int) -> bool:
        """Queue a random point of the space that no trial has measured; False if none turns up
        in FRESH_POINT_DRAWS draws, i.e. the space is exhausted."""
        measured = {r.identity for r in self.records()}
        draws = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        for _ in range(FRESH_POINT_DRAWS):
            record = self._propose(draws.ask())
            if record.identity not in measured:
                self._enqueue(record.backend, record.params)
                return True
        return False

    def _first_candidates(self) -> list[tuple[str, dict[str, Any]]]:
        """Shipped winners, then (under a loose tolerance) every backend's bf16/int8 recipes,
        then every backend's defaults. The recipes go before the fp32 defaults because they are
        what a loose tolerance is for: on a CPU with AMX, a 95 s study measured five fp32
        defaults and never reached bf16."""
        backends = self.backends.values()
        lossy = (
            [(b.name, params) for b in backends for params in b.lossy_defaults(self.spec, self.hw)]
            if self.lossy
            else []
        )
        defaults = [(b.name, b.defaults(self.hw)) for b in backends]
        return [*self.seeds, *lossy, *defaults]

    def _stop_at_budget(self, study: optuna.Study, _: optuna.trial.FrozenTrial) -> None:
        if self.n_trials is not None and self._measured() >= self.n_trials:
            study.stop()

    def _run_study(self) -> None:
        if not self.backends:
            return
        for name, params in self._first_candidates():
            self._enqueue(name, params)
        if self.n_trials is not None and self._measured() >= self.n_trials:
            return  # a resumed tune whose trials all finished before the interruption
        ok = [r for r in self.records() if r.status == "ok"]
        self.best_ms = min([self.best_ms, *(r.median_ms for r in ok)])
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures are recorded, not logged
        try:
            self.study.optimize(  # ends at the budget, the timeout or an exhausted space
                self._objective,
                timeout=self.timeout,
                catch=(RuntimeError,),
                callbacks=[self._stop_at_budget],
                gc_after_trial=True,
            )
        finally:
            optuna.logging.set_verbosity(verbosity)

    def _objective(self, trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", worker_id())
        record = self._propose(trial)
        seen = next((r for r in self.records() if r.identity == record.identity), None)
        if seen is not None:
            trial.set_user_attr("repeat_of", seen.number)
            record = seen
            if not self._enqueue_unmeasured(seed=trial.number):
                log.info("every point of the search space has been measured")
                self.study.stop()
        else:
            self._report(record, started=True)
            record = self.executor.run(record, give_up_above_ms=self.best_ms * GIVE_UP_FACTOR)
            record.worker = worker_id()
            if record.status == "ok":
                self.best_ms = min(self.best_ms, record.median_ms)
            log.info(
                "trial %s %s: %s %s",
                record.backend,
                record.params,
                record.status,
                f"{record.median_ms:.2f} ms" if record.latency else record.reason,
            )
            self._report(record, started=False)
        trial.set_user_attr("record", record.to_dict())
        trial.set_constraint("accuracy", 0.0 if record.status == "ok" else 1.0)
        if record.status == "failed":
            raise RuntimeError(record.reason)
        return record.median_ms if record.status == "ok" else 1e12

    def _report(self, record: TrialRecord, started: bool) -> None:
        if self.progress is None:
            return
        failed = [r for r in self.records() if r.status == "failed"]
        self.progress(
            ProgressEvent(
                record=record,
                started=started,
                finished=self._measured() + (0 if started else 1),
                total=self.n_trials,
                failures=len(failed) + (record.status == "failed" and not started),
                baseline_ms=self.baseline_ms,
                best_ms=self.best_ms,
            )
        )

    # Finalists ------------------------------------------------------------------------------

    def _finish(self, baseline: TrialRecord) -> SearchResult:
        records = self.records()
        feasible = sorted((r for r in records if r.status == "ok"), key=lambda r: r.median_ms)
        checked, comparison = self.executor.finals(baseline, feasible)
        updated = {r.identity: r for r in checked}  # second-length verdicts and speedups
        finalists = [r for r in checked if r.status == "ok"]
        names = {f"candidate{i}": record for i, record in enumerate(finalists)}
        winner_label, decision = decide(names, comparison)
        winner = names.get(winner_label, baseline)
        log.info("decision: %s", decision)
        baseline.speedup = 1.0
        merged = [updated.get(r.identity, r) for r in records]
        return SearchResult(
            winner=winner,
            baseline=comparison.stats["baseline"],
            winner_stats=comparison.stats[winner_label],
            speedup=comparison.speedup[winner_label],
            speedup_iqr=comparison.speedup_iqr[winner_label],
            decision=decision,
            records=[baseline, *merged],
            study_trials=self._measured(),
        )
