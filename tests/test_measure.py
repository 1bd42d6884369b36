from __future__ import annotations

import time

from autocpu.measure import interleaved, measure, median_ci_rel


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


def test_warm_up_continues_until_calls_settle():
    from autocpu.measure import warm_up

    durations = iter([0.05, 0.03, 0.02, 0.004, 0.002, 0.002, 0.002, 0.002])
    calls = []

    def slow_start():
        calls.append(1)
        time.sleep(next(durations))

    warm_up(slow_start, 2)
    assert len(calls) == 6  # stopped at the first pair of calls that agree
