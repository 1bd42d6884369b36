"""One measurement that needs a fresh process: ``python -m benchmarks.child MODE ...``.

``tune`` runs autocpu.tune() as a user would (worker processes and all) and reports its wall
time and the peak memory of its whole process tree; ``reload`` times the next process's cache
hit and its serving memory; ``serve`` gives the plain model's serving memory for comparison;
``alone`` times the plain model, or with ``--plan`` a cached plan, alone in this process.
Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import psutil
import torch

import autocpu
from autocpu.backends.base import Runner
from autocpu.finals import WARMUP_CALLS
from autocpu.inputs import synthesize_inputs
from autocpu.measure import LoadMeter, measure, warm_up
from autocpu.models import load_model_dir
from autocpu.workloads import ForwardPass

SERVE_SECONDS = 5.0


class PeakTreeRss:
    """Highest summed RSS of this process and its children, sampled every 100 ms."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.1):
            total = 0
            for process in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):  # a worker that just exited
                    total += process.memory_info().rss
            self.peak = max(self.peak, total)

    def __enter__(self) -> PeakTreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def own_peak_rss_mb() -> float | None:
    """This process's own peak RSS (Linux's VmHWM) since it started, or since ``reset_peak_rss``;
    None where /proc is missing. Not ``ru_maxrss``: a child's starts at its parent's RSS when
    forked, so under the suite it read the suite's own gigabytes."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    return None


def reset_peak_rss() -> bool:
    """Start a new peak (Linux's ``clear_refs`` 5 resets VmHWM); False where that is missing."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def serve(model: Any, batch: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """Call the model for SERVE_SECONDS. Returns the process's peak RSS so far (loading, a tune's
    cache hit, input synthesis) and the peak while serving alone: what a running server holds,
    which loading's transient copies must not hide."""
    process_peak = own_peak_rss_mb()
    fresh_peak = reset_peak_rss()
    started = time.perf_counter()
    with torch.inference_mode():
        while time.perf_counter() - started < SERVE_SECONDS:
            model(**batch)
    serving = own_peak_rss_mb() if fresh_peak else None
    peaks = [peak for peak in (process_peak, serving) if peak is not None]
    return {"process_peak_rss_mb": max(peaks, default=None), "serving_rss_mb": serving}


def time_alone(model: Any, batch: dict[str, torch.Tensor], seconds: float) -> dict[str, float]:
    """Median milliseconds of ``model``'s forward on ``batch``, called alone in this process
    for ``seconds`` after warm-up, and the share of the CPUs other work used meanwhile."""
    meter = LoadMeter()
    timed = ForwardPass([batch]).timed(Runner(model, threads=torch.get_num_threads()))
    warm_up(timed, WARMUP_CALLS)
    meter.start()
    stats = measure(
        timed, warmup=0, min_repeats=10, max_repeats=10**9, max_time_s=seconds, target_ci=0.0
    )
    return {"median_ms": stats.median_ms, "calls": stats.n, "load_percent": 100 * meter.share()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["tune", "reload", "serve", "alone"])
    parser.add_argument("model_dir")
    parser.add_argument("--task", required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--tolerance", default="strict")
    parser.add_argument("--search", default="tpe")
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--isolation", default="process")
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--plan", default=None, help="alone: the cached plan's key")
    parser.add_argument("--seconds", type=float, default=10.0, help="alone: seconds of calls")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    model = load_model_dir(args.model_dir, args.task)
    batch = synthesize_inputs(model, args.batch_size, args.seq_len, args.model_dir)
    if args.mode == "serve":
        print(json.dumps(serve(model, batch)))
        return
    if args.mode == "alone":
        if args.plan:
            model = autocpu.apply_plan(model, args.plan, batch, cache_dir=args.cache_dir)
        print(json.dumps(time_alone(model, batch, args.seconds)))
        return
    options = {"tolerance": args.tolerance, "search": args.search, "cache_dir": args.cache_dir}
    options |= {"n_trials": args.trials, "isolation": args.isolation}
    options["workload"] = "forward"  # the suite's matrix; generate() has benchmarks.generation
    started = time.perf_counter()
    if args.mode == "tune":
        with PeakTreeRss() as peak:
            tuned = autocpu.tune(model, batch, **options)
        result = {"tune_s": time.perf_counter() - started, "tune_peak_rss_mb": peak.peak / 2**20}
        result["tune_from_cache"] = tuned.from_cache
        if tuned.from_cache:  # an interrupted suite resumed: report the original search
            result |= {"tune_s": tuned.plan.tune_seconds, "tune_peak_rss_mb": None}
    else:
        tuned = autocpu.tune(model, batch, **options)
        result = {"reload_s": time.perf_counter() - started, "from_cache": tuned.from_cache}
        result |= serve(tuned, batch)
    plan = tuned.plan
    result |= {"key": plan.key, "backend": plan.backend, "params": plan.params}
    result |= {"speedup_at_tune": plan.speedup, "study_trials": plan.study_trials}
    result |= {"measured_under_load": plan.measured_under_load, "load_percent": plan.load_percent}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
