"""Latency measurement that holds up on a noisy shared machine.

Warm up, then repeat until the median's confidence interval is tight or a time cap is hit.
Candidates are compared interleaved (A B A B ...) and decided on per-round ratios, because
on a shared 2-vCPU machine absolute numbers taken minutes apart differ by up to 2x.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from autocpu.errors import AutocpuWarning

Workload = Callable[[], object]
#: Above this many rounds the signed-rank p-value uses the normal approximation (exact counting
#: grows with the cube of the rounds; at 60 the two differ in the third decimal).
EXACT_SIGNED_RANK_MAX_ROUNDS = 60


@dataclass(frozen=True)
class LatencyStats:
    """Milliseconds per call of a workload."""

    median_ms: float
    p90_ms: float
    min_ms: float
    iqr_ms: float
    ci_rel: float
    n: int
    stopped_early: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_samples(cls, samples_s: list[float], stopped_early: bool = False) -> LatencyStats:
        ms = sorted(s * 1000.0 for s in samples_s)
        quartiles = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
        return cls(
            median_ms=statistics.median(ms),
            p90_ms=_percentile(ms, 0.9),
            min_ms=ms[0],
            iqr_ms=quartiles[2] - quartiles[0],
            ci_rel=median_ci_rel(ms),
            n=len(ms),
            stopped_early=stopped_early,
        )


def _percentile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


def median_ci_rel(sorted_values: list[float]) -> float:
    """Half-width of a ~95% distribution-free CI of the median, relative to the median."""
    n = len(sorted_values)
    if n < 5:
        return math.inf
    half = 1.96 * math.sqrt(n) / 2
    lo = max(0, math.floor(n / 2 - half))
    hi = min(n - 1, math.ceil(n / 2 + half))
    median = statistics.median(sorted_values)
    return (sorted_values[hi] - sorted_values[lo]) / (2 * median) if median > 0 else math.inf


def warm_up(workload: Workload, calls: int, max_calls: int = 20, max_time_s: float = 10.0) -> None:
    """At least ``calls`` untimed calls, more until two calls in a row agree within 10%
    (lazy weight loading, allocators, JIT and engine warm-up can take many calls to settle)."""
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < max_calls and time.perf_counter() - started < max_time_s:
        t0 = time.perf_counter()
        workload()
        times.append(time.perf_counter() - t0)
        if len(times) >= max(calls, 2) and abs(times[-1] - times[-2]) <= 0.1 * min(times[-2:]):
            return


def measure(
    workload: Workload,
    *,
    warmup: int = 2,
    min_repeats: int = 5,
    max_repeats: int = 100,
    max_time_s: float = 4.0,
    target_ci: float = 0.03,
    give_up_above_ms: float | None = None,
) -> LatencyStats:
    """Time ``workload`` until the median is stable, the cap is hit, or it is clearly too slow.

    ``give_up_above_ms``: once ``min_repeats`` samples say the median is above it, stop early:
    a candidate 1.5x slower than the best so far needs no precise number.
    """
    warm_up(workload, warmup)
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < max_repeats:
        t0 = time.perf_counter()
        workload()
        samples.append(time.perf_counter() - t0)
        if len(samples) < min_repeats:
            continue
        if give_up_above_ms is not None and statistics.median(samples) * 1000 > give_up_above_ms:
            return LatencyStats.from_samples(samples, stopped_early=True)
        if (
            median_ci_rel(sorted(samples)) <= target_ci
            or time.perf_counter() - started > max_time_s
        ):
            break
    return LatencyStats.from_samples(samples)


@dataclass(frozen=True)
class Comparison:
    """Interleaved measurement of several workloads against a baseline."""

    stats: dict[str, LatencyStats]
    #: Median over rounds of baseline_time / candidate_time, per candidate.
    speedup: dict[str, float]
    #: Interquartile range of the per-round speedups: the spread to report.
    speedup_iqr: dict[str, tuple[float, float]]
    #: One-sided signed-rank p-value that the candidate is no faster than the baseline.
    p_not_faster: dict[str, float]
    rounds: int
    #: Rounds thrown away because other work used more than LOAD_LIMIT of the CPUs.
    rounds_discarded: int = 0
    #: True when quiet rounds could not be had within the time cap: the numbers include
    #: rounds taken while other work ran, and hold for a machine that busy, not a quiet one.
    under_load: bool = False
    #: Median share of the usable CPUs that other work used during the rounds, in percent.
    load_percent: float = 0.0
    #: Workloads whose turn failed during the rounds (an error of a ``droppable`` type), with
    #: the error's message: they were dropped, and the comparison is of the others.
    dropped: dict[str, str] = dataclasses.field(default_factory=dict)


#: A round during which other work (other processes, and the hypervisor's steal time) used more
#: than this share of the usable CPUs is discarded: two busy-loop processes on a 2-vCPU VM made
#: a 13-230 ms baseline take ~1.1 s per call and stored speedups 3-30x off.
LOAD_LIMIT = 0.25
#: Seconds of rounds under load to sit through, waiting for quiet ones, before measuring anyway
#: and marking the result as measured under load.
MAX_LOADED_S = 30.0


def _proc_stat_jiffies(cpus: set[int]) -> tuple[int, int]:
    """Busy and steal jiffies of ``cpus`` since boot, from ``/proc/stat``'s ``cpuN`` lines."""
    busy = steal = 0
    with open("/proc/stat") as stat:
        for line in stat:
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
                continue
            user, nice, system, _idle, _iowait, irq, softirq, stolen = map(int, fields[:8])
            busy += user + nice + system + irq + softirq
            steal += stolen
    return busy, steal


def _tree_cpu_s(root: int) -> float:
    """CPU seconds used so far by process ``root`` and every live descendant."""
    import psutil

    try:
        top = psutil.Process(root)
        processes = [top, *top.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


#: ``/proc/stat`` counts in jiffies (10 ms each): a round of a few milliseconds sees none or
#: one of them, a share of 0% or several hundred. A round's share is therefore read over at
#: least this much time, the round and those just before it.
LOAD_WINDOW_S = 0.5


class LoadMeter:
    """The share of the usable CPUs that other work used lately.

    Other work is everything ``/proc/stat`` counts busy on this process's CPUs (its affinity)
    or stolen by the hypervisor, less the CPU time of the tune's own process tree (rooted at
    ``root``: the tuner, whose workers do the measuring). :meth:`start` marks the start of a
    round; :meth:`share` reads the window since the newest mark at least LOAD_WINDOW_S old (or
    the oldest mark). Where ``/proc/stat`` cannot be read the share is 0: load is then unknown,
    not assumed.
    """

    def __init__(self, root: int | None = None) -> None:
        from autocpu.isolation import PARENT_ENV  # here: isolation imports this module's users

        self.root = root if root is not None else int(os.environ.get(PARENT_ENV, os.getpid()))
        self.cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        #: (wall seconds, busy+steal CPU seconds, own tree's CPU seconds) at each mark
        self._marks: collections.deque[tuple[float, float, float]] = collections.deque()

    def _now(self) -> tuple[float, float, float] | None:
        try:
            busy, steal = _proc_stat_jiffies(self.cpus)
        except (OSError, ValueError):
            return None
        return time.perf_counter(), (busy + steal) / self._hz, _tree_cpu_s(self.root)

    def start(self) -> None:
        now = self._now()
        if now is not None:
            self._marks.append(now)

    def share(self) -> float:
        """Other work's CPU seconds over wall seconds times usable CPUs, over the window."""
        now = self._now()
        if not self._marks or now is None or not self.cpus:
            return 0.0
        while len(self._marks) > 1 and now[0] - self._marks[1][0] >= LOAD_WINDOW_S:
            self._marks.popleft()
        since = self._marks[0]
        wall = now[0] - since[0]
        other = (now[1] - since[1]) - (now[2] - since[2])
        return max(0.0, other) / (wall * len(self.cpus)) if wall > 0 else 0.0


#: A warm process answers only once its own threads have stopped running: runtimes' thread
#: pools spin-wait after a call (on a 2-vCPU Zen 4 ONNX Runtime's ran 40-50 ms past each call,
#: PyTorch's about 10 ms), which would take CPUs from the next process's turn. At most this long.
MAX_IDLE_WAIT_S = 0.5
#: Idle: no other thread of the process runnable in this many polls in a row, this far apart.
IDLE_POLLS = 2
IDLE_POLL_S = 0.001


def _other_threads_running() -> int | None:
    """How many of this process's threads, the calling one left out, are running or runnable
    (state R in ``/proc``); None where ``/proc`` has no threads to read."""
    me = str(threading.get_native_id())
    try:
        threads = os.listdir("/proc/self/task")
    except OSError:
        return None
    running = 0
    for thread in threads:
        if thread == me:
            continue
        try:
            with open(f"/proc/self/task/{thread}/stat") as stat:
                state = stat.read().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            continue  # a thread that ended meanwhile
        running += state == "R"
    return running


def wait_until_idle(max_wait_s: float = MAX_IDLE_WAIT_S) -> float:
    """Wait until none of this process's other threads runs (IDLE_POLLS polls in a row), at
    most ``max_wait_s``; returns the seconds waited. Without ``/proc`` it returns at once."""
    started = time.perf_counter()
    quiet = 0
    while (waited := time.perf_counter() - started) < max_wait_s:
        running = _other_threads_running()
        if running is None:
            return 0.0
        quiet = quiet + 1 if running == 0 else 0
        if quiet >= IDLE_POLLS:
            break
        time.sleep(IDLE_POLL_S)
    return waited


def signed_rank_p(ratios: Sequence[float]) -> float:
    """One-sided exact Wilcoxon signed-rank p-value for "these speedups are no better than 1".

    Rounds are ranked by the size of their log-ratio, so a round's sign and size both count and
    one outlier counts no more than any other round. A sign test or a lower-quartile rule,
    which see only signs, need many more rounds to prove a 15% win on a noisy 2-vCPU VM, where
    a quarter of the rounds can go either way.
    """
    logs = [math.log(r) for r in ratios if r != 1.0]
    if not logs:
        return 1.0
    n = len(logs)
    by_size = sorted(logs, key=abs)
    positive_rank_sum = sum(rank for rank, value in enumerate(by_size, 1) if value > 0)
    if n > EXACT_SIGNED_RANK_MAX_ROUNDS:  # normal approximation, continuity-corrected
        mean, sd = n * (n + 1) / 4, math.sqrt(n * (n + 1) * (2 * n + 1) / 24)
        return 0.5 * math.erfc((positive_rank_sum - 0.5 - mean) / sd / math.sqrt(2))
    # sums[s]: how many of the 2**n equally likely sign patterns give a positive-rank sum of s
    sums = [1] + [0] * (n * (n + 1) // 2)
    for rank in range(1, n + 1):
        for total in range(len(sums) - 1, rank - 1, -1):
            sums[total] += sums[total - rank]
    return sum(sums[positive_rank_sum:]) / 2**n


def compare(samples: Mapping[str, Sequence[float]], baseline: str) -> Comparison:
    """Round-by-round ratios of each workload's times to the baseline's."""
    stats = {name: LatencyStats.from_samples(list(values)) for name, values in samples.items()}
    speedup: dict[str, float] = {}
    spread: dict[str, tuple[float, float]] = {}
    p_not_faster: dict[str, float] = {}
    for name, values in samples.items():
        ratios = sorted(b / c for b, c in zip(samples[baseline], values, strict=True))
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
        speedup[name] = statistics.median(ratios)
        spread[name] = (quartiles[0], quartiles[2])
        p_not_faster[name] = signed_rank_p(ratios)
    rounds = len(samples[baseline])
    return Comparison(stats, speedup, spread, p_not_faster, rounds)


#: One turn of a workload in the rounds: ``settle_calls`` untimed calls, then one timed call;
#: returns the timed call's seconds. A turn may run in this process or in a warm worker.
Turn = Callable[[int], float]


def local_turn(workload: Workload, clock: Callable[[], float] | None = None) -> Turn:
    """A turn of ``workload`` in this process, timed by ``clock`` (default
    ``time.perf_counter``, looked up per turn)."""

    def turn(settle_calls: int) -> float:
        now = clock or time.perf_counter
        for _ in range(settle_calls):
            workload()
        started = now()
        workload()
        return now() - started

    return turn


def interleaved(
    workloads: Mapping[str, Workload],
    baseline: str,
    *,
    warmup: int = 2,
    clock: Callable[[], float] | None = None,
    **rounds: Any,
) -> Comparison:
    """Warm each workload up, then :func:`alternate` turns of them in this process.

    ``clock`` (default ``time.perf_counter``, looked up per call) times the calls; ``rounds``
    are :func:`alternate`'s caps and rules.
    """
    clock = clock or time.perf_counter
    for workload in workloads.values():
        warm_up(workload, warmup)
    turns = {name: local_turn(workload, clock) for name, workload in workloads.items()}
    return alternate(turns, baseline, clock=clock, **rounds)


def alternate(
    turns: Mapping[str, Turn],
    baseline: str,
    *,
    min_rounds: int = 7,
    max_rounds: int = 40,
    max_time_s: float = 10.0,
    settle_calls: int = 1,
    settled: Callable[[Comparison], bool] | None = None,
    max_time_unsettled_s: float = 120.0,
    load: LoadMeter | None = None,
    max_loaded_s: float = MAX_LOADED_S,
    clock: Callable[[], float] | None = None,
    droppable: tuple[type[Exception], ...] = (),
) -> Comparison:
    """Run turns A B C A B C ... and compare each candidate with ``baseline`` round by round.

    After ``max_time_s``, rounds go on while ``settled`` (given the comparison so far) says more
    rounds could still change the caller's decision, up to ``max_time_unsettled_s`` and
    ``max_rounds``: a batch-8 round of bert-base takes seconds on 2 vCPUs, so the time cap alone
    stops at the minimum of rounds, too few to tell a 15% win from noise.

    Each turn first makes ``settle_calls`` untimed calls: switching runtimes costs time (the
    previous runtime's threads still spin-wait: on a 2-vCPU VM ONNX Runtime and PyTorch called
    alternately in one process took 71-85 ms per pair against 33 ms for the two run apart).

    ``load`` (a :class:`LoadMeter`, one made here by default) watches each round: a round in
    which other work used more than LOAD_LIMIT of the CPUs is discarded and run again. Rounds
    under load stop counting against the caps; after ``max_loaded_s`` of them the loaded rounds
    are kept too, and the comparison says it was measured under load. ``clock`` (default
    ``time.perf_counter``) times the rounds.

    A candidate whose turn raises one of ``droppable`` (a worker that crashed, say) is dropped
    from the rounds, with its message in ``Comparison.dropped``; the baseline's errors are
    raised.
    """
    if baseline not in turns:
        raise ValueError(f"baseline {baseline!r} is not among the workloads")
    turns = dict(turns)
    dropped: dict[str, str] = {}
    meter = load if load is not None else LoadMeter()
    clock = clock or time.perf_counter
    quiet: dict[str, list[float]] = {name: [] for name in turns}
    loaded: dict[str, list[float]] = {name: [] for name in turns}
    shares: list[float] = []
    quiet_s = loaded_s = 0.0
    rounds_run = 0
    while len(quiet[baseline]) < max_rounds:
        order = list(turns.items())
        if rounds_run % 2:
            order.reverse()  # alternate order so neither side always runs first
        rounds_run += 1
        meter.start()
        round_started = clock()
        times = {}
        for name, turn in order:
            try:
                times[name] = turn(settle_calls)
            except droppable as error:
                if name == baseline:
                    raise
                dropped[name] = str(error)
                del turns[name], quiet[name], loaded[name]
        share = meter.share()
        shares.append(share)
        took = clock() - round_started
        if share > LOAD_LIMIT and loaded_s < max_loaded_s:
            loaded_s += took
            for name, value in times.items():
                loaded[name].append(value)
            continue
        quiet_s += took
        for name, value in times.items():
            quiet[name].append(value)
        if len(quiet[baseline]) < min_rounds:
            continue
        if quiet_s > max_time_s and (
            settled is None or quiet_s > max_time_unsettled_s or settled(compare(quiet, baseline))
        ):
            break
    # Quiet rounds are the measurement. Only when the load never let up (the loaded-time cap
    # was reached) do rounds taken under load count, and the result says so.
    under_load = loaded_s >= max_loaded_s
    kept = {name: loaded[name] + quiet[name] for name in turns} if under_load else quiet
    result = compare(kept, baseline)
    return dataclasses.replace(
        result,
        rounds_discarded=0 if under_load else len(loaded[baseline]),
        under_load=under_load,
        load_percent=100 * statistics.median(shares) if shares else 0.0,
        dropped=dropped,
    )


#: Other work above this share of the CPUs makes latencies noisy: 2-thread PyTorch calls of
#: 0.6 ms stalled at 170-280 ms while another test run shared the two cores.
BUSY_WARNING_PERCENT = 25.0


def busy_percent() -> float:
    """How busy the CPUs are with other work just before the search starts (this process
    idle); above BUSY_WARNING_PERCENT the user is warned that the plan may not hold."""
    import psutil

    busy = psutil.cpu_percent(interval=0.3)
    if busy > BUSY_WARNING_PERCENT:
        warnings.warn(
            f"the CPUs were {busy:.0f}% busy with other work when the tune started: latencies "
            "will be noisy and the plan may not hold; tune on an otherwise idle machine",
            AutocpuWarning,
            stacklevel=5,
        )
    return busy
