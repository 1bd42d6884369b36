"""A check of the finals' protocol: does the speedup a tune stores agree with what separate
processes measure, the way two deployments would see the two engines?

    python -m benchmarks.protocol_check                         # bert-base and MiniLM, b1s128
    python -m benchmarks.protocol_check --models all-MiniLM-L6-v2 --under-load

Per model (batch 1, seq 128): the strict plan is tuned in a fresh process (or taken from the
suite's cache for that row, as its finals stored it), then fp32 eager and the plan are each
timed alone in a fresh process, one after the other, ``--repeats`` times. The check passes when
the stored speedup is within 15% of the median separate-process ratio; the spread of those
ratios over the repeats is the machine's noise, stated beside it. ``--under-load`` also tunes
the plan again (fresh cache) while two busy loops occupy both cores: its stored speedup must be
within 1.5x of the quiet separate-process ratio, or the plan marked as measured under load.

Rows go to ``benchmarks/results/protocol-<machine fingerprint>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import autocpu
from benchmarks.busy import busy_loops
from benchmarks.run_suite import ROOT, child, load_results, row_cache, say
from benchmarks.zoo import MODELS, materialize

SHAPE = "b1s128"
#: The stored speedup must be within this of the separate-process ratio on a quiet machine...
QUIET_BOUND = 0.15
#: ... and within this factor of it when tuned under load, unless marked as measured under load.
LOADED_FACTOR = 1.5


def separate_ratios(model_dir: Path, task: str, cache: Path, key: str, args: Any) -> list[dict]:
    """fp32 eager and the plan, each timed alone in a fresh process, one after the other."""
    repeats = []
    for repeat in range(args.repeats):
        say(f"  separate processes, repeat {repeat + 1}/{args.repeats}")
        seconds = str(args.seconds)
        eager = child("alone", model_dir, task, SHAPE, cache, seconds=seconds)
        plan = child("alone", model_dir, task, SHAPE, cache, seconds=seconds, plan=key)
        ratio = eager["median_ms"] / plan["median_ms"]
        repeats.append({"eager": eager, "plan": plan, "ratio": ratio})
    return repeats


def check_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    zoo = MODELS[name]
    model_dir = materialize(name, args.work)
    cache = row_cache(args.work, name, SHAPE)
    say(f"{name}: strict plan (tuned in a fresh process, or the suite's from its cache)")
    tuned = child("tune", model_dir, zoo.task, SHAPE, cache, tolerance="strict", trials=args.trials)
    repeats = separate_ratios(model_dir, zoo.task, cache, tuned["key"], args)
    ratios = [r["ratio"] for r in repeats]
    separate = statistics.median(ratios)
    stored = tuned["speedup_at_tune"]
    row: dict[str, Any] = {
        "model": name,
        "shape": SHAPE,
        "plan": {k: tuned[k] for k in ("key", "backend", "params", "tune_from_cache")},
        "stored_speedup": stored,
        "separate_ratio": separate,
        "separate_ratios": ratios,
        "noise": max(ratios) / min(ratios) - 1,
        "stored_vs_separate": stored / separate - 1,
        "quiet_ok": abs(stored / separate - 1) <= QUIET_BOUND,
        "repeats": repeats,
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if args.under_load:
        loaded_cache = args.work / "protocol-under-load" / f"{name}-{SHAPE}"
        say(f"{name}: strict plan tuned again while two busy loops occupy both cores")
        with busy_loops(2):
            loaded = child(
                "tune",
                model_dir,
                zoo.task,
                SHAPE,
                loaded_cache,
                tolerance="strict",
                trials=args.trials,
            )
        factor = loaded["speedup_at_tune"] / separate
        row["under_load"] = {
            "stored_speedup": loaded["speedup_at_tune"],
            "marked": loaded["measured_under_load"],
            "load_percent": loaded["load_percent"],
            "backend": loaded["backend"],
            "factor_vs_quiet_separate": factor,
            "ok": loaded["measured_under_load"] or 1 / LOADED_FACTOR <= factor <= LOADED_FACTOR,
        }
    return row


def markdown(results: dict) -> str:
    machine = results["machine"]
    lines = [
        f"# Protocol check: {machine['brand']}",
        "",
        f"Machine fingerprint `{machine['fingerprint']}`. Produced by "
        "`python -m benchmarks.protocol_check`. Stored: the speedup the strict plan's finals "
        "stored (each contender in a warm process of its own, alternating turns). Separate: "
        "fp32 eager and the plan each timed alone in a fresh process, one after the other; the "
        "median ratio over the repeats, and their spread (max / min - 1: the machine's noise). "
        f"Quiet check: stored within {QUIET_BOUND:.0%} of separate.",
        "",
        "| model | plan | stored | separate (repeats) | noise | stored vs separate | ok |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"].values():
        ratios = ", ".join(f"{r:.2f}" for r in run["separate_ratios"])
        lines.append(
            f"| {run['model']} {run['shape']} | {run['plan']['backend']} "
            f"| {run['stored_speedup']:.2f}x | {run['separate_ratio']:.2f}x ({ratios}) "
            f"| {run['noise']:.0%} | {run['stored_vs_separate']:+.0%} "
            f"| {'yes' if run['quiet_ok'] else '**no**'} |"
        )
    loaded = [run for run in results["runs"].values() if "under_load" in run]
    if loaded:
        lines += [
            "",
            "Tuned again while two busy loops occupied both cores: the stored speedup must be "
            f"within {LOADED_FACTOR}x of the quiet separate-process ratio, or the plan marked.",
            "",
            "| model | stored under load | vs quiet separate | marked (load) | ok |",
            "|---|---|---|---|---|",
        ]
        for run in loaded:
            u = run["under_load"]
            lines.append(
                f"| {run['model']} | {u['stored_speedup']:.2f}x ({u['backend']}) "
                f"| {u['factor_vs_quiet_separate']:.2f}x "
                f"| {'yes' if u['marked'] else 'no'} ({u['load_percent']:.0f}%) "
                f"| {'yes' if u['ok'] else '**no**'} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="bert-base,all-MiniLM-L6-v2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=10.0, help="per separate process")
    parser.add_argument("--under-load", action="store_true")
    parser.add_argument("--trials", default=None, help="tune budget (autocpu's default)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/autocpu-bench"))
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    hw = autocpu.probe()
    path = args.results / f"protocol-{hw.fingerprint()}.json"
    results = load_results(path, hw)
    for name in (m for m in args.models.split(",") if m):
        results["runs"][f"{name}/{SHAPE}"] = check_model(name, args)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1, sort_keys=True))
        path.with_suffix(".md").write_text(markdown(results))
        say(f"{name}: done ({path.with_suffix('.md')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
