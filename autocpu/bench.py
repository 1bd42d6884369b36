"""``autocpu bench``: the check a user runs to trust a plan on their machine.

Rebuilds the plan's winner (timing that one-time cost), compares its outputs with fp32 eager on
the same inputs, and measures both interleaved in one run, so the speedup is a ratio taken side
by side rather than two numbers from different moments.
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
from autocpu.backends.base import Runner
from autocpu.errors import AutocpuError
from autocpu.hardware import probe
from autocpu.inputs import normalize_inputs, signature
from autocpu.measure import Comparison, interleaved
from autocpu.models import model_fingerprint
from autocpu.options import BENCH_SECONDS
from autocpu.plans import Plan, PlanCache
from autocpu.records import GenerationStats
from autocpu.workloads import WORKLOADS


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
                f"fp32 eager, {self.comparison.rounds} interleaved rounds; {load}",
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
) -> BenchResult:
    """Rebuild ``plan`` for ``model``, check its outputs and time it against fp32 eager on
    the plan's workload (generate() for a generation plan), interleaved for ``seconds``."""
    batches = normalize_inputs(example_inputs)
    workload = WORKLOADS[plan.workload].restore(batches, plan.workload_settings)
    default_threads = torch.get_num_threads()
    started = time.perf_counter()
    tuned = apply_plan(model, plan, workload.batches, cache_dir=cache_dir)
    build_s = time.perf_counter() - started
    references = workload.references(model)
    started = time.perf_counter()
    outputs = workload.run(tuned)
    first_call_s = time.perf_counter() - started
    accuracy = workload.compare(references, outputs, Tolerance(**plan.tolerance))
    runners = {"baseline": Runner(model, threads=default_threads), "tuned": tuned}
    try:
        comparison = interleaved(
            {label: workload.timed(runner) for label, runner in runners.items()},
            "baseline",
            min_rounds=15,
            max_rounds=400,
            max_time_s=seconds,
            settle_calls=workload.settle_calls,
        )
        generation = {
            label: stats
            for label, runner in runners.items()
            if (stats := workload.generation_stats(runner)) is not None
        }
    finally:
        torch.set_num_threads(default_threads)
    return BenchResult(plan, comparison, accuracy, build_s, first_call_s, generation)


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
            f"(IQR {low:.2f}-{high:.2f}, {comparison.rounds} interleaved rounds)"
        ),
    )
