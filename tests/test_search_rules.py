"""The search's rules on a fake executor: deterministic latencies and accuracy, a fake clock for
the finals, real Optuna studies and the real search and finals code. Each runs in seconds."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import optuna
import pytest
import torch

import autocpu.backends as registry
import autocpu.measure
from autocpu.accuracy import Tolerance
from autocpu.backends.base import Availability, Backend
from autocpu.finals import conclude
from autocpu.hardware import probe
from autocpu.measure import LatencyStats
from autocpu.models import make_spec
from autocpu.records import INACCURATE, OK, AccuracyReport, TrialRecord
from autocpu.search import Budget, Search, make_sampler
from autocpu.trials import InProcessContender
from autocpu.workloads import ForwardPass

BASELINE_MS = 10.0
#: The fake baseline's backend name (the real one is eager, which these tests leave out).
BASELINE = "baseline_fake"


class FakeBackend(Backend):
    """A backend with a small categorical space; nothing is ever built."""

    description = "test only"

    def __init__(
        self, name: str, simplicity: int, space: dict[str, list], lossy=(), int4=()
    ) -> None:
        self.name, self.simplicity, self.space = name, simplicity, space
        self.lossy, self.int4 = list(lossy), list(int4)

    def availability(self, spec: Any, hw: Any) -> Availability:
        return Availability.yes()

    def defaults(self, hw: Any) -> dict[str, Any]:
        return {param: values[0] for param, values in self.space.items()}

    def lossy_defaults(self, spec: Any, hw: Any) -> list[dict[str, Any]]:
        return self.lossy

    def int4_defaults(self, spec: Any, hw: Any) -> list[dict[str, Any]]:
        return self.int4

    def suggest(self, trial: Any, spec: Any, hw: Any, **admitted: bool) -> dict[str, Any]:
        return {p: trial.suggest_categorical(self.key(p), v) for p, v in self.space.items()}

    def build(self, spec: Any, params: Any, ctx: Any) -> Any:
        raise AssertionError("a fake backend is never built")


class FakeClock:
    """``time.perf_counter`` for autocpu.measure: only the fake workloads move it."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class FakeWorkload(ForwardPass):
    """A forward pass whose calls only move the fake clock."""

    def __init__(self, clock: FakeClock, seconds: Callable[[Any], float]) -> None:
        super().__init__([])
        self.clock, self.seconds = clock, seconds

    def timed(self, runner: Any) -> Callable[[], None]:
        def call() -> None:
            self.clock.now += self.seconds(runner)

        return call


class FakeExecutor:
    """Latency and accuracy per candidate from ``latency_ms`` (None: inaccurate); the finals
    run the real :func:`run_finals` on a fake clock with the same latencies."""

    mode = "fake"

    def __init__(
        self,
        latency_ms: Callable[[str, dict], float | None],
        bad_at_second_length: set[str] = frozenset(),
        finals_ms: Callable[[str, dict], float] | None = None,
    ) -> None:
        self.latency_ms = latency_ms
        self.bad_at_second_length = bad_at_second_length
        self.finals_ms = finals_ms or latency_ms
        self.measured: list[tuple[str, dict]] = []
        self.clock = autocpu.measure.time  # the FakeClock the autouse fixture put there
        self.workload = FakeWorkload(self.clock, self._seconds)
        self.default_threads = torch.get_num_threads()

    def run(self, record: TrialRecord, give_up_above_ms: float | None = None) -> TrialRecord:
        self.measured.append((record.backend, dict(record.params)))
        ms = (
            BASELINE_MS
            if record.backend == BASELINE
            else self.latency_ms(record.backend, record.params)
        )
        if ms is None:
            return record.fail(INACCURATE, "fake: outputs differ")
        record.accuracy = AccuracyReport()
        record.latency = LatencyStats.from_samples([ms / 1000] * 5)
        record.status = OK
        return record

    def contender(self, record: TrialRecord | None) -> InProcessContender:
        return InProcessContender(self, record)

    # What an InProcessContender asks of a trial runner.
    def check_second_length(self, record: TrialRecord) -> AccuracyReport:
        bad = record.backend in self.bad_at_second_length
        return AccuracyReport(failures=["fake: shape baked in"] if bad else [])

    def baseline_runner(self) -> tuple:
        return (BASELINE, {})

    def runner(self, backend: Backend, params: dict) -> tuple[tuple, float]:
        return (backend.name, dict(params)), 0.0

    def _seconds(self, runner: tuple) -> float:
        name, params = runner
        ms = BASELINE_MS if name == BASELINE else self.finals_ms(name, params)
        return ms / 1000


@pytest.fixture
def fake_registry(monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[Backend]]:
    """Put fake backends where get_backend() finds them (finals rank ties by simplicity)."""

    def install(*backends: Backend) -> list[Backend]:
        monkeypatch.setattr(registry, "_discover", lambda: {b.name: b for b in backends})
        return list(backends)

    return install


@pytest.fixture(autouse=True)
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Freeze measure's clock outside the fake workloads, so the finals are deterministic."""
    monkeypatch.setattr(autocpu.measure, "time", FakeClock())


@pytest.fixture(scope="module")
def spec_and_hw() -> tuple[Any, Any]:
    return make_spec(torch.nn.Linear(2, 2)), probe()


def search(
    executor, backends, spec_and_hw, n_trials, *, tolerance="strict", seeds=(), strategy="tpe"
):
    spec, hw = spec_and_hw
    study = optuna.create_study(direction="minimize", sampler=make_sampler(strategy))
    budget = Budget(n_trials, None)
    runs = Search(
        executor,
        study,
        spec,
        backends,
        hw,
        budget,
        tolerance=Tolerance.parse(tolerance),
        seeds=seeds,
    )
    return runs, runs.run(TrialRecord(BASELINE, {}))


def test_shipped_seeds_then_lossy_recipes_then_defaults_come_first(fake_registry, spec_and_hw):
    backends = fake_registry(
        FakeBackend("simple", 0, {"x": [1, 2, 3]}),
        FakeBackend("fancy", 2, {"y": ["a", "b"]}, lossy=[{"y": "b"}]),
    )
    executor = FakeExecutor(lambda name, params: 5.0)
    search(executor, backends, spec_and_hw, 4, tolerance="int8", seeds=[("simple", {"x": 3})])
    assert executor.measured[:5] == [
        (BASELINE, {}),
        ("simple", {"x": 3}),  # a shipped winner
        ("fancy", {"y": "b"}),  # the lossy recipe, allowed by the tolerance
        ("simple", {"x": 1}),  # then every backend's defaults
        ("fancy", {"y": "a"}),
    ]


def test_a_seed_outside_the_search_space_is_skipped_not_fatal(fake_registry, spec_and_hw):
    backends = fake_registry(FakeBackend("fancy", 2, {"y": ["a", "b"]}))
    executor = FakeExecutor(lambda name, params: 5.0)
    seeds = [("fancy", {"y": "bf16"}), ("fancy", {"y": "b"})]  # the first: not a choice here
    search(executor, backends, spec_and_hw, 2, seeds=seeds)
    assert executor.measured == [(BASELINE, {}), ("fancy", {"y": "b"}), ("fancy", {"y": "a"})]


def test_a_point_queued_earlier_outside_the_space_is_skipped_not_fatal(fake_registry, spec_and_hw):
    """A resumed study may hold points another version queued, no longer in today's space."""
    backends = fake_registry(FakeBackend("fancy", 2, {"y": ["a", "b"]}))
    executor = FakeExecutor(lambda name, params: 5.0)
    spec, hw = spec_and_hw
    study = optuna.create_study(direction="minimize", sampler=make_sampler("tpe"))
    study.enqueue_trial({"backend": "fancy", "fancy.y": "bf16"})
    runs = Search(
        executor, study, spec, backends, hw, Budget(2, None), tolerance=Tolerance.strict()
    )
    runs.run(TrialRecord(BASELINE, {}))
    assert ("fancy", {"y": "bf16"}) not in executor.measured and runs.measured == 2
    assert optuna.trial.TrialState.PRUNED in {t.state for t in study.trials}


def test_a_strict_tolerance_skips_the_lossy_recipes(fake_registry, spec_and_hw):
    backends = fake_registry(FakeBackend("fancy", 2, {"y": ["a", "b"]}, lossy=[{"y": "b"}]))
    executor = FakeExecutor(lambda name, params: 5.0)
    search(executor, backends, spec_and_hw, 1)
    assert executor.measured == [(BASELINE, {}), ("fancy", {"y": "a"})]


@pytest.mark.parametrize(
    ("tolerance", "first"),
    [
        ("int4", [{"y": "c"}, {"y": "b"}]),  # the 4-bit recipe, then the int8 one
        ("int8", [{"y": "b"}, {"y": "a"}]),  # the int8 recipe, then the defaults
    ],
)
def test_4_bit_recipes_come_first_only_under_a_tolerance_that_admits_them(
    fake_registry, spec_and_hw, tolerance, first
):
    fancy = FakeBackend("fancy", 2, {"y": ["a", "b", "c"]}, lossy=[{"y": "b"}], int4=[{"y": "c"}])
    executor = FakeExecutor(lambda name, params: 5.0)
    search(executor, fake_registry(fancy), spec_and_hw, 3, tolerance=tolerance)
    assert executor.measured[1:3] == [("fancy", params) for params in first]


def test_a_repeated_proposal_is_not_measured_again_and_a_small_space_is_measured_whole(
    fake_registry, spec_and_hw
):
    backends = fake_registry(FakeBackend("simple", 0, {"x": [1, 2, 3]}))
    executor = FakeExecutor(lambda name, params: float(params["x"]))
    runs, (_, records) = search(executor, backends, spec_and_hw, 10)
    candidates = [m for m in executor.measured if m[0] == "simple"]
    assert sorted(m[1]["x"] for m in candidates) == [1, 2, 3]  # each point once
    assert runs.measured == 3 and len(records) == 3
    assert len(runs.study.trials) > 3  # the sampler did propose measured points again


def test_the_budget_counts_distinct_candidates(fake_registry, spec_and_hw):
    backends = fake_registry(FakeBackend("simple", 0, {"x": list(range(4)), "z": list(range(5))}))
    executor = FakeExecutor(lambda name, params: 1.0 + params["x"] + params["z"] / 10)
    runs, (_, records) = search(executor, backends, spec_and_hw, 7)
    candidates = [m for m in executor.measured if m[0] == "simple"]
    points = [tuple(sorted(p.items())) for _, p in candidates]
    assert len(points) == 7 and len(set(points)) == 7
    assert runs.measured == 7 and len(records) == 7


def decision(executor, backends, spec_and_hw, n_trials=4):
    _, (baseline, records) = search(executor, backends, spec_and_hw, n_trials)
    return conclude(executor, baseline, records)


def test_the_fastest_beyond_noise_wins(fake_registry, spec_and_hw):
    backends = fake_registry(
        FakeBackend("simple", 0, {"x": [1]}), FakeBackend("fancy", 5, {"y": [1]})
    )
    executor = FakeExecutor(lambda name, params: {"simple": 5.0, "fancy": 4.0}[name])
    result = decision(executor, backends, spec_and_hw)
    assert result.winner.backend == "fancy" and result.speedup == pytest.approx(2.5)
    assert result.decision.startswith("fancy won at 2.50x")


def test_a_tie_within_noise_goes_to_the_simpler_backend(fake_registry, spec_and_hw):
    backends = fake_registry(
        FakeBackend("simple", 0, {"x": [1]}), FakeBackend("fancy", 5, {"y": [1]})
    )
    executor = FakeExecutor(lambda name, params: {"simple": 5.1, "fancy": 5.0}[name])
    result = decision(executor, backends, spec_and_hw)
    assert result.winner.backend == "simple", result.decision
    assert "a tie within 3% noise, and simple is simpler" in result.decision


def test_a_finalist_that_fails_the_second_length_is_out(fake_registry, spec_and_hw):
    backends = fake_registry(
        FakeBackend("simple", 0, {"x": [1]}), FakeBackend("baked", 1, {"y": [1]})
    )
    executor = FakeExecutor(
        lambda name, params: {"simple": 5.0, "baked": 2.0}[name], bad_at_second_length={"baked"}
    )
    result = decision(executor, backends, spec_and_hw)
    assert result.winner.backend == "simple"
    baked = next(r for r in result.records if r.backend == "baked")
    assert baked.status == INACCURATE and "shape baked in" in baked.reason
    assert baked.speedup is None  # never re-measured


def test_a_candidate_within_noise_of_the_baseline_does_not_win(fake_registry, spec_and_hw):
    backends = fake_registry(FakeBackend("simple", 0, {"x": [1]}))
    executor = FakeExecutor(lambda name, params: BASELINE_MS / 1.02)
    result = decision(executor, backends, spec_and_hw)
    assert result.winner.backend == BASELINE and result.speedup == 1.0
    assert "no candidate beat the baseline beyond noise and chance" in result.decision


def test_a_win_that_chance_explains_does_not_win(fake_registry, spec_and_hw):
    """Per round the candidate is 1.25x faster three times in five and 1.3x slower twice: the
    median ratio is 1.25x, yet the slower rounds weigh more, and a signed-rank test over the
    rounds cannot rule out chance."""
    backends = fake_registry(FakeBackend("simple", 0, {"x": [1]}))
    pattern = itertools.cycle([BASELINE_MS / 1.25] * 3 + [BASELINE_MS * 1.3] * 2)
    executor = FakeExecutor(lambda name, params: 8.0, finals_ms=lambda name, params: next(pattern))
    result = decision(executor, backends, spec_and_hw)
    assert result.winner.backend == BASELINE, result.decision
    assert "beyond noise and chance (best: simple at 1.25x" in result.decision
