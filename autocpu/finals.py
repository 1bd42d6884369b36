"""The finals: the fastest candidates re-checked at a second sequence length, re-measured
against the baseline in alternating turns, and the decision.

Each finalist and the baseline is a :class:`Contender`: built once and kept warm, in a worker
process of its own (the default: a deployment runs one engine in its process, and runtimes
sharing one disturb each other's timings) or, with ``isolation="none"``, all in this process,
which is biased and meant for tests.

The fastest finalist wins if it beats the baseline beyond noise (median per-round ratio) and
beyond chance (one-sided signed-rank test); finalists within noise of the fastest tie, and a
tie goes to the simplest backend.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from autocpu.backends import get_backend
from autocpu.errors import one_line
from autocpu.measure import Comparison, LatencyStats, alternate
from autocpu.records import BASELINE, FAILED, INACCURATE, OK, GenerationStats, TrialRecord

if TYPE_CHECKING:
    from autocpu.accuracy import AccuracyReport
    from autocpu.trials import Executor

log = logging.getLogger(__name__)

#: Ratios closer than this are noise on a shared 2-vCPU machine: the same interleaved ratio
#: moved by about this much between two runs minutes apart.
NOISE = 0.03
#: Candidates re-measured in the finals (the fastest that pass the second-length check).
FINALISTS = 3
#: A finalist must beat the baseline at this one-sided significance (signed-rank test).
ALPHA = 0.05


#: Untimed calls a contender makes once built, before its first turn.
WARMUP_CALLS = 2


class FinalsError(RuntimeError):
    """A contender could not be built or run; the message names it and why, in one line."""


class Contender(Protocol):
    """One engine of the finals, built and warm, taking timed turns."""

    def check_second_length(self) -> AccuracyReport | None:
        """Its accuracy at a second sequence length (None where the workload has none)."""
        ...

    def turn(self, settle_calls: int) -> float:
        """``settle_calls`` untimed calls, then one timed call: its seconds."""
        ...

    def generation_stats(self) -> GenerationStats | None: ...

    def close(self) -> None: ...


def contender_name(record: TrialRecord | None) -> str:
    """How messages name the contender of ``record`` (None: the baseline)."""
    return "fp32 eager" if record is None else record.backend


#: Builds the contender of a record (None: the baseline); raises FinalsError when it cannot.
StartContender = Callable[[TrialRecord | None], Contender]


@dataclass
class Finals:
    """What the finals measured: every candidate re-checked (failures carry their new status)
    and the interleaved comparison of the finalists, keyed by their labels."""

    checked: list[TrialRecord]
    finalists: dict[str, TrialRecord]
    comparison: Comparison
    #: Generation workloads: TTFT, TPOT and tokens/s per label, the baseline's included.
    generation: dict[str, GenerationStats] = field(default_factory=dict)


@dataclass
class SearchResult:
    """The decision and the evidence a plan keeps."""

    winner: TrialRecord
    baseline: LatencyStats
    winner_stats: LatencyStats
    speedup: float
    speedup_iqr: tuple[float, float]
    decision: str
    records: list[TrialRecord]
    baseline_generation: GenerationStats | None = None
    winner_generation: GenerationStats | None = None
    #: The finals could not get quiet rounds: other work ran while they measured.
    under_load: bool = False
    #: Median share of the CPUs other work used during the finals, in percent.
    load_percent: float = 0.0


def run_finals(candidates: list[TrialRecord], start: StartContender, settle_calls: int) -> Finals:
    """Check ``candidates`` (fastest first) at a second length until FINALISTS pass, then
    re-measure those against the baseline in alternating turns until the decision is settled."""
    checked: list[TrialRecord] = []
    finalists: dict[str, TrialRecord] = {}
    contenders: dict[str, Contender] = {}
    try:
        for record in candidates:
            if len(finalists) == FINALISTS:
                break
            checked.append(record)
            contender = _checked(record, start)
            if contender is not None:
                label = f"candidate{len(finalists)}"
                finalists[label], contenders[label] = record, contender
        contenders = {BASELINE: start(None), **contenders}
        comparison = alternate(
            {label: contender.turn for label, contender in contenders.items()},
            BASELINE,
            settle_calls=settle_calls,
            settled=lambda so_far: not undecided(finalists, so_far),
            droppable=(FinalsError,),
        )
        for label, reason in comparison.dropped.items():
            finalists.pop(label).fail(FAILED, reason)
            contenders.pop(label).close()
        generation = {
            label: stats
            for label, contender in contenders.items()
            if (stats := contender.generation_stats()) is not None
        }
    finally:
        for contender in contenders.values():
            contender.close()
    for label, record in finalists.items():
        record.speedup = comparison.speedup[label]
    return Finals(checked, finalists, comparison, generation)


def _checked(record: TrialRecord, start: StartContender) -> Contender | None:
    """``record``'s contender if it builds and passes at a second length; else None, with the
    failure in the record."""
    try:
        contender = start(record)
    except FinalsError as error:
        record.fail(FAILED, str(error))
        return None
    try:
        report = contender.check_second_length()
    except Exception as error:  # a graph that only runs at the example's shape
        contender.close()
        record.fail(FAILED, f"at a second length: {one_line(error)}")
        return None
    if report is not None and not report.passed:
        contender.close()
        record.fail(INACCURATE, "; ".join(report.failures[:3]))
        return None
    return contender


def conclude(executor: Executor, baseline: TrialRecord, records: list[TrialRecord]) -> SearchResult:
    """Run the finals over the study's feasible candidates and decide."""
    feasible = sorted((r for r in records if r.status == OK), key=lambda r: r.median_ms)
    finals = run_finals(feasible, executor.contender, executor.workload.settle_calls)
    label, decision = decide(finals.finalists, finals.comparison)
    log.info("decision: %s", decision)
    updated = {r.identity: r for r in finals.checked}  # second-length verdicts and speedups
    baseline.speedup = 1.0
    comparison = finals.comparison
    return SearchResult(
        winner=finals.finalists.get(label, baseline),
        baseline=comparison.stats[BASELINE],
        winner_stats=comparison.stats[label],
        speedup=comparison.speedup[label],
        speedup_iqr=comparison.speedup_iqr[label],
        decision=decision,
        records=[baseline, *(updated.get(r.identity, r) for r in records)],
        baseline_generation=finals.generation.get(BASELINE),
        winner_generation=finals.generation.get(label),
        under_load=comparison.under_load,
        load_percent=comparison.load_percent,
    )


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
    is ahead of the baseline beyond noise but not yet proven faster. Finalists the comparison
    does not have (dropped from the rounds) are left out."""
    names = {label: record for label, record in names.items() if label in comparison.speedup}
    if not names:
        return False
    _, chosen = _preferred(names, comparison.speedup)
    return comparison.speedup[chosen] >= 1 + NOISE and not _proven(comparison, chosen)


def decide(names: Mapping[str, TrialRecord], comparison: Comparison) -> tuple[str, str]:
    """The winner's label (``"baseline"`` when none is proven faster) and why."""
    if not names:
        return BASELINE, "no candidate passed the accuracy gate: keeping the model as is"
    speedup = comparison.speedup
    fastest, chosen = _preferred(names, speedup)
    record = names[chosen]
    low, high = comparison.speedup_iqr[chosen]
    p_value = comparison.p_not_faster[chosen]
    p_text = "p<0.001" if p_value < 0.001 else f"p={p_value:.3f}"
    details = f"IQR {low:.2f}-{high:.2f}, {p_text} over {comparison.rounds} interleaved rounds"
    if comparison.under_load:
        details += (
            f", measured under load: other work used {comparison.load_percent:.0f}% of the CPUs"
        )
    elif comparison.rounds_discarded:
        details += f"; {comparison.rounds_discarded} rounds under load discarded"
    if not _proven(comparison, chosen):
        return BASELINE, (
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
