"""One tuning run, in three stages: reuse a plan (the user cache, then the shipped database,
each checked by its canary), else search, then write the plan.

:class:`Tuning` holds what every stage needs (the model spec, the workload, the machine, the
cache, the plan key and the options); the example inputs enter it once, as the workload.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from autocpu import sharing
from autocpu.accuracy import Tolerance
from autocpu.backends import Backend, BuildContext, all_backends, get_backend
from autocpu.canary import save_canary, why_stale
from autocpu.errors import AutocpuWarning, one_line
from autocpu.finals import SearchResult, conclude
from autocpu.hardware import probe
from autocpu.inputs import normalize_inputs, typical_inputs
from autocpu.isolation import choose_executor
from autocpu.measure import busy_percent
from autocpu.models import ModelSpec, make_spec
from autocpu.options import TuneOptions
from autocpu.plans import Plan, PlanCache, current_versions, ensure_writable, plan_key
from autocpu.records import INELIGIBLE, TrialRecord
from autocpu.search import Budget, Search
from autocpu.storage import study_for
from autocpu.trials import TrialRunner
from autocpu.tuned import TunedModel, build_tuned, wrap
from autocpu.workloads import WORKLOADS, Generation, Workload


@dataclass(frozen=True)
class SearchCosts:
    """How the search ran, as the plan records it."""

    seconds: float
    cpu_busy_percent: float
    measured_in: str
    study_trials: int


class Tuning:
    """A tune of one model on one machine: :meth:`run` returns the drop-in model."""

    def __init__(self, model: torch.nn.Module, example_inputs: Any, options: TuneOptions) -> None:
        self.backends = _selected(options.backends)
        self.spec = make_spec(model, options.task)
        self.spec.workload = options.workload_for(self.spec.task)
        tolerance = options.tolerance.for_workload(self.spec.workload)
        self.options = options = replace(options, tolerance=tolerance)
        self.workload = _workload(self.spec.workload, self._batches(example_inputs), options)
        self.hw = probe()
        self.cache = PlanCache(Path(options.cache_dir) if options.cache_dir else None)
        self.key = plan_key(
            self.spec.fingerprint,
            self.workload.signature(),
            self.hw.fingerprint(),
            options.tolerance.to_dict(),
            options.backends,
            options.search,
            {"name": self.workload.name, **self.workload.settings()},
        )

    def _batches(self, example_inputs: Any) -> list[dict[str, Any]]:
        """The user's inputs, or typical ones made from the config (with a warning)."""
        if example_inputs is not None:
            return normalize_inputs(example_inputs)
        reserve = self.options.max_new_tokens if self.spec.workload == Generation.name else 0
        batches = typical_inputs(self.spec.model, reserve)
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in batches[0].items())
        warnings.warn(
            f"no example_inputs: tuning on made-up inputs ({shapes}); pass the inputs you "
            "serve (e.g. tokenizer(texts, return_tensors='pt')) for a plan of their shapes",
            AutocpuWarning,
            stacklevel=4,
        )
        return batches

    def run(self) -> TunedModel:
        return (self.options.cache and self.reuse()) or self.search()

    # Stage 1: reuse ------------------------------------------------------------------------

    def reuse(self) -> TunedModel | None:
        """The user cache's plan for this key, else the shipped database's, if it holds here."""
        cached = self._checked_plan("cache")
        if cached is not None:
            return cached
        shipped = sharing.shipped_plan(self.key)
        if shipped is None:
            return None
        sharing.install(self.cache, shipped)
        return self._checked_plan("tuning_db")

    def _checked_plan(self, source: str) -> TunedModel | None:
        """The cached plan's model, if the plan exists, fits here, rebuilds and passes its
        canary (made from the fp32 model first if the plan came without one)."""
        plan = self.cache.load(self.key)
        if plan is None:
            return None
        reason = plan.why_unusable(self.hw.fingerprint())
        if reason is None:
            try:
                tuned = build_tuned(self.spec, plan, self.workload, self.cache, source=source)
            except Exception as error:  # a plan that no longer builds is re-tuned, not fatal
                reason = f"it failed to rebuild ({one_line(error)})"
            else:
                canary = self.cache.canary_path(self.key)
                tolerance = Tolerance(**plan.tolerance)
                reason = why_stale(canary, tuned, tolerance, self.workload, self.spec.model)
        if reason is not None:
            warnings.warn(
                f"cached plan {self.key[:12]} not used: {reason}; re-tuning",
                AutocpuWarning,
                stacklevel=5,
            )
            return None
        return tuned

    # Stage 2: search -----------------------------------------------------------------------

    def search(self) -> TunedModel:
        started = time.perf_counter()
        ensure_writable(self.cache.root)
        tolerance = self.options.tolerance
        references = self.workload.references(self.spec.model)
        busy = busy_percent()
        named = self.options.backends is not None
        eligible, skipped = _eligibility(self.backends, self.spec, self.hw, named)
        artifacts = self.cache.artifacts_dir(self.spec.fingerprint_id)
        new_tokens = self.workload.settings().get("max_new_tokens")
        ctx = BuildContext(self.hw, self.workload.batches, artifacts, new_tokens)
        trial_runner = TrialRunner(self.spec, self.workload, references, tolerance, ctx)
        executor = choose_executor(trial_runner, self.options)
        versions = current_versions(sorted({p for b in all_backends() for p in b.requires}))
        search = Search(
            executor,
            study_for(self.options, self.key, versions, self.hw.fingerprint(), self.cache.root),
            self.spec,
            eligible,
            self.hw,
            Budget(*self.options.budget),
            tolerance=tolerance,
            seeds=sharing.seeds(self.spec.fingerprint, self.hw.family_key()),
            progress=self.options.progress,
        )
        baseline, records = search.run(_baseline_record(self.spec))
        result = conclude(executor, baseline, records)
        costs = SearchCosts(time.perf_counter() - started, busy, executor.mode, search.measured)
        plan = self.plan(result, skipped, versions, costs)
        runner, _ = trial_runner.runner(get_backend(plan.backend), plan.params)
        return wrap(self.spec.model, runner, plan, source="search")

    # Stage 3: plan -------------------------------------------------------------------------

    def plan(
        self,
        result: SearchResult,
        skipped: list[TrialRecord],
        versions: dict[str, str],
        costs: SearchCosts,
    ) -> Plan:
        """The plan of ``result``, written to the cache with its canary unless caching is off."""
        plan = _plan_of(self, result, skipped, versions, costs)
        if self.options.cache:
            save_canary(self.cache.canary_path(self.key), self.workload, self.spec.model)
            self.cache.save(plan)
        return plan


def _plan_of(
    tuning: Tuning,
    result: SearchResult,
    skipped: list[TrialRecord],
    versions: dict[str, str],
    costs: SearchCosts,
) -> Plan:
    """The plan a search's result makes: the winner, what it holds for, and the evidence."""
    winner = result.winner
    return Plan(
        key=tuning.key,
        backend=winner.backend,
        params=winner.params,
        task=tuning.spec.task,
        model=tuning.spec.fingerprint,
        inputs=tuning.workload.signature(),
        machine={**tuning.hw.to_dict(), "fingerprint": tuning.hw.fingerprint()},
        tolerance=tuning.options.tolerance.to_dict(),
        versions=versions,
        backends=tuning.options.backends,
        workload=tuning.workload.name,
        workload_settings=tuning.workload.settings(),
        baseline=result.baseline,
        winner=result.winner_stats,
        speedup=result.speedup,
        speedup_iqr=list(result.speedup_iqr),
        baseline_generation=result.baseline_generation,
        winner_generation=result.winner_generation,
        accuracy=winner.accuracy,
        one_time_costs={
            "build_s": winner.build_s or 0.0,
            "first_call_s": winner.first_call_s or 0.0,
        },
        decision=result.decision,
        trials=[*result.records, *skipped],
        tune_seconds=costs.seconds,
        study_trials=costs.study_trials,
        search=tuning.options.search,
        cpu_busy_percent=costs.cpu_busy_percent,
        measured_in=costs.measured_in,
        measured_under_load=result.under_load,
        load_percent=result.load_percent,
    )


def _workload(name: str, batches: list[dict[str, Any]], options: TuneOptions) -> Workload:
    """The workload ``name`` over the example batches, with the options that shape it."""
    if name == Generation.name:
        return Generation(batches, options.max_new_tokens)
    return WORKLOADS[name](batches)


def _selected(names: list[str] | None) -> list[Backend]:
    return [get_backend(name) for name in names] if names else all_backends()


def _eligibility(
    backends: list[Backend], spec: ModelSpec, hw: Any, named: bool
) -> tuple[list[Backend], list[TrialRecord]]:
    """The backends that can run this model here, and a record for each that cannot
    (``named``: the user chose the backends by name)."""
    eligible, skipped = [], []
    for backend in backends:
        available = backend.eligibility(spec, hw, named=named)
        if available.ok:
            eligible.append(backend)
        else:
            reason = available.reason + (f" (fix: {available.fix})" if available.fix else "")
            skipped.append(TrialRecord(backend.name, {}, status=INELIGIBLE, reason=reason))
    return eligible, skipped


def _baseline_record(spec: ModelSpec) -> TrialRecord:
    """The user's model exactly as given (fp32, its attention, torch's default threads)."""
    from autocpu.backends.eager import current_attention

    return TrialRecord("eager", {"attention": current_attention(spec.model), "precision": "fp32"})
