"""The search: an Optuna study over the eligible backends' settings.

It tries shipped winners first, then (when the tolerance admits them) every backend's bf16/int8
recipes, then every backend's defaults, then TPE's proposals under the accuracy constraint. The
study may already hold trials (a resumed tune, or machines sharing a storage): a finished trial
is reused, never repeated. The finals (:mod:`autocpu.finals`) decide among what it measured.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna

from autocpu.accuracy import Tolerance
from autocpu.backends import Backend
from autocpu.hardware import CpuInfo
from autocpu.models import ModelSpec
from autocpu.records import BASELINE, FAILED, OK, TrialRecord
from autocpu.trials import Executor

log = logging.getLogger(__name__)

#: A candidate whose median passes this multiple of the best so far stops being measured.
GIVE_UP_FACTOR = 1.5
#: Random draws that look for a point no trial has measured, after the sampler proposed one that
#: was; when none turns up, the search space is taken as exhausted and the study stops.
FRESH_POINT_DRAWS = 200
#: The objective of a candidate that failed or missed the tolerance: recorded, never chosen.
INFEASIBLE_MS = 1e12
#: The trial attribute naming the candidate a running trial is measuring.
CLAIM = "claim"


def make_sampler(strategy: str, seed: int | None = None) -> optuna.samplers.BaseSampler:
    """Optuna's TPE within a budget, or every point of the space (``"exhaustive"``).

    Without a ``seed`` each process draws its own: processes sharing a study must not propose
    the same points in the same order."""
    if strategy == "exhaustive":
        with warnings.catch_warnings():  # experimental since Optuna 3.1, stable in use
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.BruteForceSampler(seed=seed)
    # constant_liar: machines sharing a study steer away from points others are measuring.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, constant_liar=True)


def worker_id() -> str:
    """Which process ran a trial: a resumed study re-queues the trials of dead processes."""
    return f"{socket.gethostname()}:{os.getpid()}"


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


@dataclass
class Progress:
    """The best latency so far, and the events a progress display is sent."""

    callback: ProgressCallback | None
    total: int | None
    baseline_ms: float = float("inf")
    best_ms: float = float("inf")

    def tell(self, record: TrialRecord, *, started: bool, finished: int, failures: int) -> None:
        if self.callback is not None:
            event = ProgressEvent(
                record, started, finished, self.total, failures, self.baseline_ms, self.best_ms
            )
            self.callback(event)


@dataclass
class StudyState:
    """The study as one read of its storage (a round trip on PostgreSQL) sees it."""

    records: dict[tuple, TrialRecord] = field(default_factory=dict)
    #: Finished trials that measured a candidate: repeats of a measured point, and trials
    #: killed mid-run (no record; their point is queued again), excluded.
    measured: int = 0
    failures: int = 0
    #: Candidates running trials are measuring now, each with the first trial that claimed it.
    claims: dict[str, int] = field(default_factory=dict)

    @classmethod
    def read(cls, study: optuna.Study) -> StudyState:
        state = cls()
        done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
        for trial in study.get_trials(deepcopy=False):
            claim = trial.user_attrs.get(CLAIM)
            if claim and trial.state == optuna.trial.TrialState.RUNNING:
                state.claims[claim] = min(state.claims.get(claim, trial.number), trial.number)
            data = trial.user_attrs.get("record")
            if not data or "repeat_of" in trial.user_attrs:
                continue
            record = TrialRecord.from_dict(data)
            state.measured += trial.state in done
            state.failures += record.status == FAILED
            state.records.setdefault(record.identity, record)
        return state

    @property
    def best_ms(self) -> float:
        return min((r.median_ms for r in self.records.values() if r.status == OK), default=1e300)


def was_queued(study: optuna.Study, number: int) -> bool:
    """Whether trial ``number`` runs a point queued with ``enqueue_trial``: a study resumed from
    a journal may hold points queued by another version or machine, outside today's space."""
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    return "fixed_params" in frozen.system_attrs


def claim_of(record: TrialRecord) -> str:
    """The candidate as a string a study can store: the same for the same backend and settings."""
    return json.dumps(record.identity, default=str)


@dataclass(frozen=True)
class Budget:
    """When the study stops: after ``n_trials`` distinct candidates, or ``timeout`` seconds."""

    n_trials: int | None
    timeout: float | None


class Space:
    """The eligible backends' settings as Optuna parameters, and the candidates tried first."""

    def __init__(
        self, backends: list[Backend], spec: ModelSpec, hw: CpuInfo, tolerance: Tolerance
    ) -> None:
        self.backends = {b.name: b for b in backends}
        self.spec, self.hw = spec, hw
        self.lossy, self.int4 = tolerance.admits_lossy, tolerance.admits_int4

    def propose(self, trial: optuna.Trial) -> TrialRecord:
        """The candidate ``trial`` asks for: the sampler's pick, or a queued point."""
        name = trial.suggest_categorical("backend", list(self.backends))
        backend = self.backends[name]
        params = backend.suggest(trial, self.spec, self.hw, lossy=self.lossy, int4=self.int4)
        return TrialRecord(name, params, number=trial.number)

    def point(self, name: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """A candidate as the study's parameters (each prefixed with its backend's name)."""
        backend = self.backends[name]
        return {"backend": name, **{backend.key(k): v for k, v in params.items()}}

    def contains(self, name: str, params: Mapping[str, Any]) -> bool:
        """Whether the candidate is a point of this space. Optuna fails a trial whose queued
        value lies outside a parameter's choices (a shipped winner whose precision this
        tolerance rules out, say), which would end the whole study; a dry run tells first."""
        if name not in self.backends:
            return False
        dry_run = optuna.create_study()
        dry_run.enqueue_trial(self.point(name, params))
        try:
            self.propose(dry_run.ask())
        except ValueError as error:
            log.warning("candidate %s %s is outside this search's space: %s", name, params, error)
            return False
        return True

    def first_candidates(
        self, seeds: list[tuple[str, dict[str, Any]]]
    ) -> list[tuple[str, dict[str, Any]]]:
        """Shipped winners, then (under a loose tolerance) every backend's 4-bit and bf16/int8
        recipes, then every backend's defaults, each that lies in this space. The recipes go
        first because they are what a loose tolerance is for: a small budget spent on fp32
        defaults would never reach them."""
        backends = self.backends.values()
        int4 = [
            (b.name, p) for b in backends if self.int4 for p in b.int4_defaults(self.spec, self.hw)
        ]
        recipes = [
            (b.name, p)
            for b in backends
            if self.lossy
            for p in b.lossy_defaults(self.spec, self.hw)
        ]
        defaults = [(b.name, b.defaults(self.hw)) for b in backends]
        return [c for c in [*seeds, *int4, *recipes, *defaults] if self.contains(*c)]


class Search:
    """The study over ``backends``; :meth:`run` returns the baseline and every distinct record.

    The budget counts measured candidates: when the sampler proposes a point already measured,
    the trial reuses its result (Optuna still learns from it) and a random unmeasured point is
    queued in its place, so ``n_trials=20`` measures 20 distinct candidates, or the whole space
    if it is smaller.
    """

    def __init__(
        self,
        executor: Executor,
        study: optuna.Study,
        spec: ModelSpec,
        backends: list[Backend],
        hw: CpuInfo,
        budget: Budget,
        *,
        tolerance: Tolerance,
        seeds: list[tuple[str, dict[str, Any]]] = (),
        progress: ProgressCallback | None = None,
    ) -> None:
        self.executor, self.study, self.budget, self.seeds = executor, study, budget, seeds
        self.space = Space(backends, spec, hw, tolerance)
        self.progress = Progress(progress, budget.n_trials)
        self.measured = 0

    def run(self, baseline: TrialRecord) -> tuple[TrialRecord, list[TrialRecord]]:
        """Measure ``baseline`` (the model as given), then the study."""
        baseline = self.executor.run(baseline)
        if baseline.status != OK:
            raise RuntimeError(f"measuring the model as given failed: {baseline.reason}")
        baseline.reason = BASELINE
        self.progress.best_ms = self.progress.baseline_ms = baseline.median_ms
        log.info("baseline (the model as given): %.2f ms", baseline.median_ms)
        if self.space.backends:
            self._run_study()
        final = StudyState.read(self.study)
        self.measured = final.measured
        return baseline, list(final.records.values())

    def _run_study(self) -> None:
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        try:
            for name, params in self.space.first_candidates(self.seeds):
                self._enqueue(name, params)
            state = StudyState.read(self.study)
            self.measured = state.measured
            if self._budget_spent():
                return  # a resumed tune whose trials all finished before the interruption
            self.progress.best_ms = min(self.progress.best_ms, state.best_ms)
            self.study.optimize(  # ends at the budget, the timeout or an exhausted space
                self._objective,
                timeout=self.budget.timeout,
                callbacks=[lambda study, _: self._budget_spent() and study.stop()],
                gc_after_trial=True,
            )
        finally:
            optuna.logging.set_verbosity(verbosity)

    def _budget_spent(self) -> bool:
        return self.budget.n_trials is not None and self.measured >= self.budget.n_trials

    def _enqueue(self, name: str, params: Mapping[str, Any]) -> None:
        self.study.enqueue_trial(self.space.point(name, params), skip_if_exists=True)

    def _enqueue_unmeasured(self, state: StudyState, seed: int) -> bool:
        """Queue a random point of the space that no trial has measured or claimed; False if
        none turns up in FRESH_POINT_DRAWS draws, i.e. the space is exhausted."""
        draws = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        for _ in range(FRESH_POINT_DRAWS):
            record = self.space.propose(draws.ask())
            if record.identity not in state.records and claim_of(record) not in state.claims:
                self._enqueue(record.backend, record.params)
                return True
        return False

    def _objective(self, trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", worker_id())
        try:
            record = self.space.propose(trial)
        except ValueError as error:  # see Space.contains
            if not was_queued(self.study, trial.number):
                raise
            log.warning("a queued candidate is outside this search's space (%s): skipped", error)
            raise optuna.TrialPruned(str(error)) from None
        claim = claim_of(record)
        trial.set_user_attr(CLAIM, claim)  # before the read: of two claims, both see both
        state = StudyState.read(self.study)
        self.measured = state.measured
        if self._budget_spent():  # other processes sharing the study spent it meanwhile
            self.study.stop()
            raise optuna.TrialPruned("the trial budget is spent")
        seen = state.records.get(record.identity)
        if seen is None and state.claims.get(claim, trial.number) < trial.number:
            if not self._enqueue_unmeasured(state, seed=trial.number):
                self.study.stop()  # what is left, other processes are measuring
            raise optuna.TrialPruned(f"another process is measuring {claim}")
        if seen is not None:
            trial.set_user_attr("repeat_of", seen.number)
            record = seen
            if not self._enqueue_unmeasured(state, seed=trial.number):
                log.info("every point of the search space has been measured")
                self.study.stop()
        else:
            record = self._measure(record, state)
        trial.set_user_attr("record", record.to_dict())
        trial.set_constraint("accuracy", 0.0 if record.status == OK else 1.0)
        return record.median_ms if record.status == OK else INFEASIBLE_MS

    def _measure(self, record: TrialRecord, state: StudyState) -> TrialRecord:
        progress = self.progress
        progress.tell(record, started=True, finished=state.measured, failures=state.failures)
        record = self.executor.run(record, give_up_above_ms=progress.best_ms * GIVE_UP_FACTOR)
        record.worker = worker_id()
        if record.status == OK:
            progress.best_ms = min(progress.best_ms, record.median_ms)
        self.measured = state.measured + 1
        result = f"{record.median_ms:.2f} ms" if record.latency else record.reason
        log.info("trial %s %s: %s %s", record.backend, record.params, record.status, result)
        failures = state.failures + (record.status == FAILED)
        progress.tell(record, started=False, finished=self.measured, failures=failures)
        return record
