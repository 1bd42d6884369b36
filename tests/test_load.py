"""Load is measured, not only warned about: rounds taken while other work runs are discarded,
a machine that stays busy gives a result marked as measured under load, and plans, their
reports and ``autocpu bench --update`` say and fix it."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_inputs, tiny_model

import autocpu
from autocpu.bench import BenchResult, updated_plan
from autocpu.errors import AutocpuError
from autocpu.measure import LOAD_LIMIT, LOAD_WINDOW_S, Comparison, LoadMeter, interleaved
from autocpu.report import explain_table, plans_table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.busy import busy_loops


class FakeClock:
    """Time that passes only when a fake workload says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ScriptedLoad:
    """Stands in for the CPU counters: the share of other work each round sees, in order."""

    def __init__(self, shares: list[float], then: float = 0.0) -> None:
        self.shares, self.then = list(shares), then

    def start(self) -> None:
        return None

    def share(self) -> float:
        return self.shares.pop(0) if self.shares else self.then


def workloads(clock: FakeClock, load: ScriptedLoad) -> dict:
    """A baseline of 10 ms and a candidate of 5 ms; under load the baseline takes 100 ms."""

    def taking(quiet_s: float, loaded_s: float):
        def call() -> None:
            clock.now += loaded_s if load.shares and load.shares[0] > LOAD_LIMIT else quiet_s

        return call

    return {"base": taking(0.010, 0.100), "fast": taking(0.005, 0.005)}


def measured(load: ScriptedLoad, **options: float) -> Comparison:
    """7 interleaved rounds on the fake clock under the scripted ``load``."""
    clock = FakeClock()
    return interleaved(
        workloads(clock, load),
        "base",
        warmup=0,
        min_rounds=7,
        max_time_s=0.0,
        load=load,
        clock=clock,
        settle_calls=0,
        **options,
    )


def test_rounds_under_load_are_discarded_and_run_again() -> None:
    result = measured(ScriptedLoad([0.0, 0.9, 0.9, 0.0, 0.9]))
    assert result.rounds == 7 and result.rounds_discarded == 3
    assert not result.under_load
    assert result.speedup["fast"] == pytest.approx(2.0)
    assert result.stats["base"].median_ms == pytest.approx(10.0)


def test_a_machine_that_stays_busy_is_measured_and_marked() -> None:
    result = measured(ScriptedLoad([], then=0.9), max_loaded_s=0.5)
    assert result.under_load and result.load_percent == pytest.approx(90.0)
    assert result.rounds >= 7 and result.rounds_discarded == 0


@pytest.mark.slow
def test_the_meter_sees_other_processes_but_not_this_one() -> None:
    meter = LoadMeter()
    meter.start()
    deadline = time.perf_counter() + 1.0
    while time.perf_counter() < deadline:  # this process's own work is not load
        pass
    assert meter.share() < LOAD_LIMIT
    with busy_loops(len(meter.cpus)):
        meter.start()
        time.sleep(1.0)
        assert meter.share() > 0.5


@pytest.mark.slow
def test_rounds_shorter_than_a_jiffy_are_judged_over_a_window() -> None:
    meter = LoadMeter()
    with busy_loops(len(meter.cpus)):
        meter.start()
        time.sleep(LOAD_WINDOW_S)
        shares = []
        for _ in range(30):  # 2 ms rounds: /proc/stat moves in 10 ms jiffies
            meter.start()
            time.sleep(0.002)
            shares.append(meter.share())
    assert min(shares) > LOAD_LIMIT, shares


@pytest.fixture(scope="module")
def quiet_plan() -> autocpu.Plan:
    model = tiny_model("bert", "AutoModelForSequenceClassification")
    tuned = autocpu.tune(
        model, tiny_inputs(), backends=["torchscript"], n_trials=2, isolation="none", cache=False
    )
    return tuned.plan


@pytest.mark.slow
def test_a_tune_under_two_busy_loops_is_marked(quiet_plan: autocpu.Plan) -> None:
    model = tiny_model("bert", "AutoModelForSequenceClassification")
    with busy_loops(len(LoadMeter().cpus)), pytest.warns(autocpu.AutocpuWarning, match="busy"):
        tuned = autocpu.tune(
            model,
            tiny_inputs(),
            backends=["torchscript"],
            n_trials=2,
            isolation="none",
            cache=False,
        )
    plan = tuned.plan
    assert plan.measured_under_load and plan.load_percent > 100 * LOAD_LIMIT
    assert "measured under load" in plan.decision
    assert not quiet_plan.measured_under_load


def test_plans_and_reports_say_measured_under_load(quiet_plan: autocpu.Plan) -> None:
    loaded = dataclasses.replace(quiet_plan, measured_under_load=True, load_percent=85.0)
    assert "(under load)" in plans_table([loaded]) and "(under load)" not in plans_table(
        [quiet_plan]
    )
    assert "other work used 85% of the CPUs" in explain_table(loaded)
    assert "measured under load" not in explain_table(quiet_plan)


def test_bench_update_refuses_a_measurement_under_load(quiet_plan: autocpu.Plan) -> None:
    model = tiny_model("bert", "AutoModelForSequenceClassification")
    from autocpu.bench import bench

    result = bench(model, tiny_inputs(), quiet_plan, seconds=0.5)
    updated = updated_plan(result)
    assert updated.speedup == result.comparison.speedup["tuned"]
    assert updated.winner == result.comparison.stats["tuned"]
    assert "re-measured by autocpu bench" in updated.decision
    busy = dataclasses.replace(result.comparison, under_load=True, load_percent=90.0)
    with pytest.raises(AutocpuError, match="not updated: other work used 90%"):
        updated_plan(BenchResult(**{**vars(result), "comparison": busy}))
