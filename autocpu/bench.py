"""``autocpu bench``: the check a user runs to trust a plan on their machine.

Rebuilds the plan's winner (timing that one-time cost), compares its outputs with fp32 eager on
the same inputs, and measures both as the finals do: each in a warm worker process of its own,
taking alternating turns, so the speedup is a ratio taken side by side rather than two numbers
from different moments, and neither runtime disturbs the other.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autocpu.accuracy import AccuracyReport, Tolerance
from autocpu.api import apply_plan
from autocpu.backends import BuildContext
from autocpu.errors import AutocpuError
from autocpu.finals import Contender, FinalsError
from autocpu.hardware import probe
from autocpu.inputs import normalize_inputs, signature
from autocpu.isolation import choose_executor
from autocpu.measure import Comparison, alternate
from autocpu.models import make_spec, model_fingerprint
from autocpu.options import BENCH_SECONDS, TuneOptions
from autocpu.plans import Plan, PlanCache
from autocpu.records import GenerationStats, TrialRecord
from autocpu.trials import TrialRunner
from autocpu.workloads import WORKLOADS, Workload


@dataclass
class BenchResult:
    plan: Plan
    comparison: Comparison
    accuracy: AccuracyReport
    build_s: float
    first_call_s: float
    #: Generation plans: TTFT, TPOT and tokens/s of "baseline" and "tuned".
    generation: dict[str, GenerationStats]

    def summary(self) -> str:
        base, tuned = self.comparison.stats["baseline"], self.comparison.stats["tuned"]
        low, high = self.comparison.speedup_iqr["tuned"]
        verdict = (
            "outputs within tolerance"
            if self.accuracy.passed
            else ("OUTPUTS OUTSIDE TOLERANCE: " + "; ".join(self.accuracy.failures[:2]))
        )
        generation = [
            f"  {label:<8} TTFT {stats.ttft_ms:.1f} ms, TPOT {stats.tpot_ms:.2f} ms, "
            f"{stats.tokens_per_s:.1f} tokens/s ({stats.new_tokens} new tokens)"
            for label, stats in self.generation.items()
        ]
        load = (
            f"MEASURED UNDER LOAD (other work used {self.comparison.load_percent:.0f}% of the "
            "CPUs throughout): the speedup holds for a machine that busy, not a quiet one"
            if self.comparison.under_load
            else f"{self.comparison.rounds_discarded} rounds under load discarded"
        )
        return "\n".join(
            [
                f"plan {self.plan.key[:12]}: {self.plan.backend} {self.plan.params}",
                f"speedup {self.comparison.speedup['tuned']:.2f}x (IQR {low:.2f}-{high:.2f}) over "
                f"fp32 eager, {self.comparison.rounds} alternating rounds; {load}",
                f"  tuned    median {tuned.median_ms:.2f} ms, p90 {tuned.p90_ms:.2f} ms",
                f"  baseline median {base.median_ms:.2f} ms, p90 {base.p90_ms:.2f} ms",
                *generation,
                f"accuracy: relative diff {self.accuracy.max_rel:.2e}, cosine "
                f"{self.accuracy.min_cosine:.6f}, max abs {self.accuracy.max_abs:.2e}: {verdict}",
                f"one-time cost: build {self.build_s:.2f} s, first call {self.first_call_s:.2f} s",
            ]
        )


def matching_plan(cache: PlanCache, model: torch.nn.Module, batches: list[dict]) -> Plan:
    """The newest cached plan for this model, these input shapes and this machine."""
    fingerprint, inputs, machine = model_fingerprint(model), signature(batches), probe()
    found = [
        p
        for p in cache.all()
        if p.model == fingerprint
        and p.inputs == inputs
        and p.machine.get("fingerprint") == machine.fingerprint()
    ]
    if not found:
        raise AutocpuError(
            "no cached plan for this model, these input shapes and this machine",
            "run 'autocpu tune' with the same --batch-size/--seq-len first, or pass --plan KEY",
        )
    return max(found, key=lambda p: p.created)


def bench(
    model: torch.nn.Module,
    example_inputs: Any,
    plan: Plan,
    *,
    seconds: float = BENCH_SECONDS,
    cache_dir: str | Path | None = None,
    isolation: str = "process",
) -> BenchResult:
    """Rebuild ``plan`` for ``model``, check its outputs and time it against fp32 eager on
    the plan's workload (generate() for a generation plan), in alternating turns for
    ``seconds``: each in a worker process of its own, or both in this one with
    ``isolation="none"`` (biased)."""
    batches = normalize_inputs(example_inputs)
    workload = WORKLOADS[plan.workload].restore(batches, plan.workload_settings)
    default_threads = torch.get_num_threads()  # the baseline's; the plan's runner sets its own
    try:
        started = time.perf_counter()
        tuned = apply_plan(model, plan, workload.batches, cache_dir=cache_dir)
        build_s = time.perf_counter() - started
        references = workload.references(model)
        started = time.perf_counter()
        outputs = workload.run(tuned)
        first_call_s = time.perf_counter() - started
    finally:
        torch.set_num_threads(default_threads)
    tolerance = Tolerance(**plan.tolerance)
    accuracy = workload.compare(references, outputs, tolerance)
    trial_runner = _trial_runner(model, plan, workload, references, tolerance, cache_dir)
    executor = choose_executor(trial_runner, TuneOptions(isolation=isolation))
    contenders: dict[str, Contender] = {}
    try:
        contenders["baseline"] = executor.contender(None)
        contenders["tuned"] = executor.contender(TrialRecord(plan.backend, dict(plan.params)))
        comparison = alternate(
            {label: contender.turn for label, contender in contenders.items()},
            "baseline",
            min_rounds=15,
            max_rounds=400,
            max_time_s=seconds,
            settle_calls=workload.settle_calls,
        )
        generation = {
            label: stats
            for label, contender in contenders.items()
            if (stats := contender.generation_stats()) is not None
        }
    except FinalsError as error:
        raise AutocpuError(
            f"plan {plan.key[:12]} could not be timed: {error}",
            "run 'autocpu bench --isolation none' to time it in this process",
        ) from error
    finally:
        for contender in contenders.values():
            contender.close()
    return BenchResult(plan, comparison, accuracy, build_s, first_call_s, generation)


def _trial_runner(
    model: torch.nn.Module,
    plan: Plan,
    workload: Workload,
    references: list[Any],
    tolerance: Tolerance,
    cache_dir: str | Path | None,
) -> TrialRunner:
    """What builds the plan's engine and the baseline, here or in workers."""
    spec = make_spec(model, plan.task)
    artifacts = PlanCache(cache_dir).artifacts_dir(spec.fingerprint_id)
    new_tokens = workload.settings().get("max_new_tokens")
    ctx = BuildContext(probe(), workload.batches, artifacts, new_tokens)
    return TrialRunner(spec, workload, references, tolerance, ctx)


def updated_plan(result: BenchResult) -> Plan:
    """The plan with the figures ``result`` measured (``autocpu bench --update``).

    Refused for a measurement taken under load, or whose outputs left the tolerance: neither
    may replace what the plan says.
    """
    comparison, plan = result.comparison, result.plan
    if comparison.under_load:
        raise AutocpuError(
            f"plan {plan.key[:12]} not updated: other work used {comparison.load_percent:.0f}% "
            "of the CPUs throughout the measurement",
            "run 'autocpu bench --update' again when the machine is quiet",
        )
    if not result.accuracy.passed:
        raise AutocpuError(
            f"plan {plan.key[:12]} not updated: its outputs are outside its tolerance here",
            "re-tune the model here with 'autocpu tune'",
        )
    low, high = comparison.speedup_iqr["tuned"]
    return dataclasses.replace(
        plan,
        baseline=comparison.stats["baseline"],
        winner=comparison.stats["tuned"],
        speedup=comparison.speedup["tuned"],
        speedup_iqr=[low, high],
        baseline_generation=result.generation.get("baseline", plan.baseline_generation),
        winner_generation=result.generation.get("tuned", plan.winner_generation),
        measured_under_load=False,
        load_percent=comparison.load_percent,
        decision=(
            f"{plan.decision}; re-measured by autocpu bench at {comparison.speedup['tuned']:.2f}x "
            f"(IQR {low:.2f}-{high:.2f}, {comparison.rounds} alternating rounds)"
        ),
    )
