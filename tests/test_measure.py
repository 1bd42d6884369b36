from __future__ import annotations

import itertools
import math
import threading
import time

from autocpu import measure as measure_module
from autocpu.measure import (
    interleaved,
    measure,
    median_ci_rel,
    signed_rank_p,
    wait_until_idle,
)


def _sleeper(seconds: float):
    return lambda: time.sleep(seconds)


def test_measure_reports_the_workload_time():
    stats = measure(_sleeper(0.002), max_time_s=0.5)
    assert stats.n >= 5
    assert 2.0 <= stats.median_ms < 6.0
    assert stats.min_ms <= stats.median_ms <= stats.p90_ms


def test_measure_gives_up_on_a_clearly_slower_candidate():
    stats = measure(_sleeper(0.004), give_up_above_ms=1.0, max_time_s=5)
    assert stats.stopped_early and stats.n == 5


def test_interleaved_ratio_finds_the_faster_workload():
    comparison = interleaved(
        {"base": _sleeper(0.006), "fast": _sleeper(0.002)}, "base", min_rounds=7, max_time_s=0.3
    )
    assert comparison.rounds >= 7
    assert comparison.speedup["base"] == 1.0
    assert 1.8 < comparison.speedup["fast"] < 3.5
    low, high = comparison.speedup_iqr["fast"]
    assert low <= comparison.speedup["fast"] <= high


def test_median_ci_narrows_with_identical_samples():
    assert median_ci_rel([1.0] * 20) == 0.0
    assert median_ci_rel([1.0, 2.0]) == float("inf")


def test_warm_up_continues_until_calls_settle(monkeypatch):
    """On a fake clock: a real sleep(0.004) can last 0.02 s on a busy CI machine."""
    from autocpu import measure

    now = [0.0]
    monkeypatch.setattr(measure.time, "perf_counter", lambda: now[0])
    durations = iter([0.05, 0.03, 0.02, 0.004, 0.002, 0.002, 0.002, 0.002])
    calls = []

    def slow_start():
        calls.append(1)
        now[0] += next(durations)

    measure.warm_up(slow_start, 2)
    assert len(calls) == 6  # stopped at the first pair of calls that agree


def test_signed_rank_p_counts_every_sign_pattern():
    """Against brute force: the share of the 2**n sign patterns of the ranks whose positive
    rank sum reaches the observed one."""
    ratios = [1.3, 0.8, 1.1, 1.25, 0.95, 1.05, 1.4, 0.9, 1.2, 1.15]
    ranks = {r: rank for rank, r in enumerate(sorted(ratios, key=lambda r: abs(math.log(r))), 1)}
    observed = sum(ranks[r] for r in ratios if r > 1)
    patterns = itertools.product((0, 1), repeat=len(ratios))
    reaching = sum(
        sum(s * k for s, k in zip(p, range(1, 11), strict=True)) >= observed for p in patterns
    )
    assert signed_rank_p(ratios) == reaching / 2**10
    assert signed_rank_p([1.1] * 7) == 1 / 128 and signed_rank_p([0.9] * 7) == 1.0
    assert signed_rank_p([1.0] * 5) == 1.0  # no round decided either way


def test_signed_rank_p_approximates_above_the_exact_limit(monkeypatch):
    ratios = [1.1, 0.93, 1.2, 0.97, 1.05, 1.02, 0.96, 1.3] * 10
    exact = signed_rank_p(ratios)
    monkeypatch.setattr(measure_module, "EXACT_SIGNED_RANK_MAX_ROUNDS", 10)
    assert abs(signed_rank_p(ratios) - exact) < 0.002


def test_interleaved_goes_on_while_unsettled():
    workloads = {"base": _sleeper(0.002), "fast": _sleeper(0.001)}
    seen: list[int] = []

    def never(comparison):
        seen.append(comparison.rounds)
        return False

    slow = interleaved(
        workloads, "base", min_rounds=3, max_time_s=0.05, settled=never, max_time_unsettled_s=0.4
    )
    quick = interleaved(workloads, "base", min_rounds=3, max_time_s=0.05, settled=lambda c: True)
    assert slow.rounds > 2 * quick.rounds and seen == sorted(seen) and seen[-1] >= slow.rounds - 1
    assert slow.p_not_faster["fast"] < 0.001 and slow.p_not_faster["base"] == 1.0


def test_wait_until_idle_waits_for_the_process_s_spinning_threads():
    def spin(seconds: float) -> None:
        until = time.perf_counter() + seconds
        while time.perf_counter() < until:
            pass

    spinner = threading.Thread(target=spin, args=(0.2,))
    spinner.start()
    waited = wait_until_idle()
    assert not spinner.is_alive() and waited >= 0.15
    assert wait_until_idle() < 0.05  # nothing else runs now
