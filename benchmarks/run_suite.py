"""The benchmark suite: every model and shape, by-hand columns against autocpu's plans and the
oracle, measured side by side: each column built and kept warm in a process of its own, the
columns taking alternating turns (see ``benchmarks.warm``).

    python -m benchmarks.run_suite                       # the whole matrix (hours on 2 cores)
    python -m benchmarks.run_suite --models bert-base --shapes b1s128

Results accumulate in ``benchmarks/results/<machine fingerprint>.json`` (a finished model and
shape is skipped unless ``--remeasure``, its plans reused, or ``--force``, searched anew), so
the matrix can be filled in over several runs; the markdown table and PNG chart beside it are
rewritten from the JSON after every run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import autocpu
from autocpu.accuracy import Tolerance, compare_outputs
from autocpu.backends import all_backends
from autocpu.backends.base import Runner, quiet_build_logs
from autocpu.errors import AutocpuError
from autocpu.inputs import synthesize_inputs
from autocpu.measure import busy_percent
from autocpu.models import load_model_dir
from autocpu.outputs import named_tensors
from autocpu.plans import PlanCache, current_versions
from autocpu.sharing import SharedPlan, export_bundle, install, read_bundle, tuning_db
from autocpu.workloads import ForwardPass
from benchmarks import render
from benchmarks.by_hand import BY_HAND, Column, build_column
from benchmarks.limits import flops_per_call, fraction_of_peak, gemm_peaks
from benchmarks.warm import Recipe, measure_columns, warm_turn
from benchmarks.zoo import MODELS, materialize

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"b1s128": (1, 128), "b8s128": (8, 128), "b1s16": (1, 16)}
TOLERANCES = ("strict", "bf16", "int8")
DEFAULT_MODELS = ("bert-base", "distilbert-base", "roberta-base", "gpt2", "all-MiniLM-L6-v2")
#: Seconds of alternating rounds per model and shape (at least MIN_ROUNDS rounds).
MEASURE_SECONDS = {"b1s128": 90.0, "b8s128": 180.0, "b1s16": 5.0}
MIN_ROUNDS = 10
#: The package's shipped tuning database, which --export-tuning-db writes by default.
TUNING_DB = ROOT / "autocpu" / "tuning_db"


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def child(
    mode: str, model_dir: Path, task: str, shape: str, cache: Path, **options: str | None
) -> dict:
    """Run ``benchmarks.child`` in a fresh process with an empty tuning database (the suite
    measures searches, so shipped plans must not answer for it)."""
    batch_size, seq_len = SHAPES[shape]
    command = [sys.executable, "-m", "benchmarks.child", mode, str(model_dir), "--task", task]
    command += ["--batch-size", str(batch_size), "--seq-len", str(seq_len)]
    command += ["--cache-dir", str(cache)]
    for name, value in options.items():
        command += [f"--{name}", value] if value is not None else []
    env = {**os.environ, "AUTOCPU_TUNING_DB": str(cache / "no-tuning-db")}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[3:6])} failed: {done.stderr.strip()[-600:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def plan_precision(backend: str, params: dict[str, Any]) -> str:
    """The precision a plan's matrix math runs in, for its fraction of the GEMM peak.

    OpenVINO's int8 weights count as int8: its compressed-weight matmuls ran GPT-2 at twice the
    fp32 GEMM peak here, so they are not fp32 math on decompressed weights."""
    if backend == "openvino" and params.get("weights") != "int8":
        return "bf16" if params.get("precision") == "bf16" else "fp32"
    text = " ".join(str(v) for v in params.values())
    return "int8" if "int8" in text else "bf16" if "bf16" in text else "fp32"


def primary(output: Any) -> torch.Tensor:
    """The main output tensor (last_hidden_state / logits / first of a tuple)."""
    return next(iter(named_tensors(output).values()))


def tune_columns(
    model_dir: Path, task: str, shape: str, cache: Path, args: argparse.Namespace, oracle: bool
) -> dict[str, dict]:
    """Tune in fresh processes (one per tolerance, plus the exhaustive oracle), then time each
    plan's reload in another fresh process.

    The oracle's trials run in its own process (``isolation="none"``): builds are reused
    across thread counts, which makes the sweep of ~130 points affordable; its winner is
    re-measured with every other column like the rest.
    """
    found = {}
    trials = str(args.trials) if args.trials else None
    for tolerance in args.tolerances:
        say(f"  tune {tolerance}")
        tuned = child("tune", model_dir, task, shape, cache, tolerance=tolerance, trials=trials)
        say(f"  reload {tolerance}")
        reloaded = child("reload", model_dir, task, shape, cache, tolerance=tolerance)
        if not reloaded["from_cache"]:
            raise RuntimeError(f"the {tolerance} plan was not reloaded from the cache")
        found[f"autocpu_{tolerance}"] = {**tuned, **reloaded, "tolerance": tolerance}
    if oracle:
        say("  oracle: exhaustive sweep, strict")
        found["oracle_strict"] = {
            **child("tune", model_dir, task, shape, cache, search="exhaustive", isolation="none"),
            "tolerance": "strict",
        }
    return found


def plan_column(name: str, tuned: dict, model: torch.nn.Module, batch: dict, cache: Path) -> Column:
    started = time.perf_counter()
    applied = autocpu.apply_plan(model, tuned["key"], batch, cache_dir=cache)
    setup_s = time.perf_counter() - started
    started = time.perf_counter()
    applied(**batch)
    label = f"autocpu {tuned['tolerance']}" if name.startswith("autocpu") else "oracle (strict)"
    precision = plan_precision(tuned["backend"], tuned["params"])
    return Column(name, label, applied, precision, setup_s, time.perf_counter() - started)


class ServedColumn:
    """A column in its own process (see ``benchmarks.warm``): turns of one forward pass on the
    row's batch, its main output, and its description."""

    def __init__(self, column: Column, batch: dict[str, torch.Tensor]) -> None:
        self.column, self.batch = column, batch
        if column.run is not None:
            self.runner = Runner(column.run, threads=torch.get_num_threads())
            self.turn = warm_turn(ForwardPass([batch]).timed(self.runner))

    def described(self) -> Column:
        return dataclasses.replace(self.column, run=None)

    def output(self) -> torch.Tensor:
        return primary(self.runner(**self.batch)).float()


def serve_by_hand(name: str, model_dir: Path, task: str, batch: dict) -> ServedColumn:
    with quiet_build_logs():
        return ServedColumn(build_column(name, model_dir, task, batch), batch)


def serve_plan(
    name: str, tuned: dict, model_dir: Path, task: str, batch: dict, cache: Path
) -> ServedColumn:
    model = load_model_dir(model_dir, task)
    with quiet_build_logs():
        return ServedColumn(plan_column(name, tuned, model, batch, cache), batch)


def column_recipes(
    model_dir: Path, task: str, batch: dict, cache: Path, tuned: dict[str, dict]
) -> list[Recipe]:
    """The by-hand columns (fp32 eager, the baseline, first) and the plans, one process each."""
    threads = torch.get_num_threads()
    common = {"model_dir": model_dir, "task": task, "batch": batch}
    recipes = [
        Recipe(name, "benchmarks.run_suite", "serve_by_hand", {"name": name, **common}, threads)
        for name in BY_HAND
    ]
    for name, plan in tuned.items():
        kwargs = {"name": name, "tuned": plan, "cache": cache, **common}
        recipes.append(Recipe(name, "benchmarks.run_suite", "serve_plan", kwargs, threads))
    return recipes


def run_one(
    name: str, shape: str, args: argparse.Namespace, peaks: dict, earlier: dict | None = None
) -> dict:
    """Measure one model and shape. ``earlier`` is the row's previous run when it is measured
    again with reused plans: their tunes' costs come from it."""
    zoo = MODELS[name]
    model_dir = materialize(name, args.work)
    cache = row_cache(args.work, name, shape)
    model = load_model_dir(model_dir, zoo.task)
    batch = synthesize_inputs(model, *SHAPES[shape], str(model_dir))
    flops = flops_per_call(model, batch)
    oracle = wants_oracle(args, f"{name}/{shape}")
    tuned = tune_columns(model_dir, zoo.task, shape, cache, args, oracle)
    say("  serving memory of the plain model")
    baseline_rss = child("serve", model_dir, zoo.task, shape, cache)
    measured = measure_columns(
        column_recipes(model_dir, zoo.task, batch, cache, tuned),
        say,
        ("output",),
        min_rounds=MIN_ROUNDS,
        max_rounds=1000,
        max_time_s=args.seconds or MEASURE_SECONDS[shape],
        settle_calls=ForwardPass.settle_calls,
    )
    columns, comparison, outputs = measured.columns, measured.comparison, measured.answers
    reference = outputs["eager"]
    rows = {}
    for column in columns:
        row: dict[str, Any] = {
            "label": column.label,
            "kind": "by-hand" if column.name in BY_HAND else column.name.split("_")[0],
            "precision": column.precision,
            "setup_s": column.setup_s,
            "first_call_s": column.first_call_s,
            "error": column.error,
        }
        if column.name in outputs:
            accuracy = compare_outputs(
                reference,
                outputs[column.name],
                Tolerance.parse("strict"),
                batch.get("attention_mask"),
            )
            stats = comparison.stats[column.name]
            gflops = flops / (stats.median_ms / 1000.0) / 1e9
            row |= {
                "median_ms": stats.median_ms,
                "p90_ms": stats.p90_ms,
                "speedup": comparison.speedup[column.name],
                "speedup_iqr": list(comparison.speedup_iqr[column.name]),
                "max_abs": accuracy.max_abs,
                "min_cosine": accuracy.min_cosine,
                "strict_ok": accuracy.passed,
                "gflops": gflops,
                "fraction_of_peak": fraction_of_peak(gflops, column.precision, peaks),
            }
        row |= tuned.get(column.name, {})
        rows[column.name] = row
    tuned_before = keep_tune_costs(rows, earlier) if earlier else None
    return {
        "model": name,
        "model_description": zoo.description,
        "shape": shape,
        "batch_size": SHAPES[shape][0],
        "seq_len": SHAPES[shape][1],
        "gflop_per_call": flops / 1e9,
        "rounds": comparison.rounds,
        "protocol": render.APART,
        "rounds_discarded": comparison.rounds_discarded,
        "under_load": comparison.under_load,
        "load_percent": comparison.load_percent,
        "baseline_serving_rss_mb": baseline_rss["serving_rss_mb"],
        "baseline_process_peak_rss_mb": baseline_rss["process_peak_rss_mb"],
        "columns": rows,
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpu_busy_percent_before": busy_percent(),
    } | ({"plans_tuned": tuned_before} if tuned_before else {})


def reuse_plans(earlier: dict, cache: Path) -> list[str]:
    """Put a finished row's autocpu plans back into its cache (from the work folder, else the
    shipped tuning database), so measuring the row again does not search again."""
    target = PlanCache(cache)
    shipped = {entry.plan.key: entry for entry in tuning_db()}  # one read of the bundle
    reused = []
    for name, column in earlier["columns"].items():
        if not name.startswith("autocpu_") or "key" not in column:
            continue
        if target.load(column["key"]) is None:
            shared = shipped.get(column["key"])
            if shared is None:
                continue
            install(target, shared)
        reused.append(name)
    return reused


def keep_tune_costs(rows: dict[str, dict], earlier: dict) -> str | None:
    """A plan answered from the cache keeps the tune time and memory its search measured; returns
    when that search ran, or None when every plan was tuned anew."""
    kept = False
    for name, row in rows.items():
        before = earlier["columns"].get(name, {})
        if row.get("tune_from_cache") and before.get("key") == row.get("key"):
            row |= {k: before[k] for k in ("tune_s", "tune_peak_rss_mb") if k in before}
            kept = True
    return earlier.get("plans_tuned", earlier["measured"]) if kept else None


def wants_oracle(args: argparse.Namespace, run_id: str) -> bool:
    return args.oracle_all or run_id in args.oracle


def row_cache(work: Path, model: str, shape: str) -> Path:
    """One row's plans and studies: an interrupted row resumes from them."""
    return work / "cache" / f"{model}-{shape}"


def export_tuning_db(results: dict, work: Path, target: Path) -> Path:
    """The suite's autocpu plans (not the oracle's) as one bundle for the shipped tuning
    database. Plans of rows whose work folder is gone (measured on another run) are kept from
    the bundle. No canary ships: ``tune()`` makes one from the user's model on a shipped plan's
    first use, which keeps the database small enough for the wheel."""
    earlier = (
        {shared.plan.key: shared.plan for shared in read_bundle(target)} if target.exists() else {}
    )
    staging = work / "tuning-db-export"
    shutil.rmtree(staging, ignore_errors=True)  # a canary left by an earlier export must not ship
    combined = PlanCache(staging)
    keys = []
    for row, run in results["runs"].items():
        source = PlanCache(row_cache(work, run["model"], run["shape"]))
        for name, column in run["columns"].items():
            if not name.startswith("autocpu_") or "key" not in column:
                continue
            plan = source.load(column["key"]) or earlier.get(column["key"])
            if plan is None:
                say(f"  not shipped: {row} {name} (its plan is in neither cache)")
                continue
            install(combined, SharedPlan(plan, canary=None))
            keys.append(plan.key)
    export_bundle(combined, sorted(keys), target)  # one order, whichever rows ran this time
    return target


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--shapes", default="b1s128,b8s128")
    parser.add_argument("--tolerances", default=",".join(TOLERANCES))
    parser.add_argument(
        "--oracle",
        default="all",
        help="'all', 'none', or MODEL/SHAPE,... runs that also get the exhaustive sweep (a "
        "finished row without one is measured again, its plans reused)",
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/autocpu-bench"))
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--seconds", type=float, default=None, help="seconds of alternating rounds per run"
    )
    parser.add_argument("--trials", type=int, default=None, help="tune budget (autocpu's default)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="re-run finished model/shapes from scratch (their cached plans and studies go)",
    )
    parser.add_argument(
        "--remeasure",
        action="store_true",
        help="measure finished model/shapes again with their plans reused (no new search; an "
        "oracle column needs --oracle for its row, whose cached sweep answers)",
    )
    parser.add_argument(
        "--remeasure-peak",
        action="store_true",
        help="measure the GEMM peak again and rescale every column's fraction of it",
    )
    parser.add_argument(
        "--export-tuning-db",
        type=Path,
        nargs="?",
        const=TUNING_DB,
        default=None,
        metavar="DIR",
        help="write the suite's plans to DIR/<fingerprint>.json (default DIR: autocpu/tuning_db/)",
    )
    parser.add_argument(
        "--export-only",
        action="store_true",
        help="measure nothing: export the finished rows' plans (to autocpu/tuning_db/ unless "
        "--export-tuning-db names a DIR)",
    )
    args = parser.parse_args(argv)
    if args.export_only and args.export_tuning_db is None:
        args.export_tuning_db = TUNING_DB
    args.models = [m for m in args.models.split(",") if m]
    args.shapes = [s for s in args.shapes.split(",") if s]
    args.tolerances = [t for t in args.tolerances.split(",") if t]
    unknown = [m for m in args.models if m not in MODELS] + [
        s for s in args.shapes if s not in SHAPES
    ]
    if unknown:
        parser.error(
            f"unknown model or shape {unknown}: models {list(MODELS)}, shapes {list(SHAPES)}"
        )
    args.oracle_all = args.oracle == "all"
    args.oracle = [] if args.oracle in ("all", "none") else args.oracle.split(",")
    return args


def load_results(path: Path, hw: autocpu.CpuInfo) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"machine": {**hw.to_dict(), "fingerprint": hw.fingerprint()}, "runs": {}}


def save(results: dict, path: Path) -> None:
    """The JSON, then the markdown and chart rendered from it (same name, other suffixes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, sort_keys=True))
    render.write(results, path.with_suffix(""))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    hw = autocpu.probe()
    fingerprint = hw.fingerprint()
    path = args.results / f"{fingerprint}.json"
    results = load_results(path, hw)
    if not args.export_only:
        measure_rows(results, args, path, hw.native_bf16)
    if args.export_tuning_db:
        target = args.export_tuning_db / f"{fingerprint}.json"
        say(f"tuning database: {export_tuning_db(results, args.work, target)}")
    return 0


def measure_rows(results: dict, args: argparse.Namespace, path: Path, native_bf16: bool) -> None:
    """Measure every asked-for row that is not finished yet, saving the results after each."""
    if "gemm_peaks" not in results or args.force or args.remeasure_peak:
        say("measuring the GEMM peak per precision")
        results["gemm_peaks"] = gemm_peaks(native_bf16)
        results["threads"] = torch.get_num_threads()
        peaks = results["gemm_peaks"]
        for column in (c for run in results["runs"].values() for c in run["columns"].values()):
            if "gflops" in column:
                column["fraction_of_peak"] = fraction_of_peak(
                    column["gflops"], column["precision"], peaks
                )
        if results["runs"]:
            save(results, path)
    for name in args.models:
        for shape in args.shapes:
            run_id = f"{name}/{shape}"
            earlier = None if args.force else results["runs"].get(run_id)
            if (
                earlier
                and not args.remeasure
                and (not wants_oracle(args, run_id) or "oracle_strict" in earlier["columns"])
            ):
                say(f"{run_id}: already measured (--remeasure or --force measure it again)")
                continue
            if args.force:  # else the tunes would answer from the row's cached plans
                shutil.rmtree(row_cache(args.work, name, shape), ignore_errors=True)
            if earlier:
                reused = reuse_plans(earlier, row_cache(args.work, name, shape))
                say(f"{run_id}: measured again; plans reused: {reused or 'none'}")
            say(f"{run_id}: start")
            try:
                results["runs"][run_id] = run_one(name, shape, args, results["gemm_peaks"], earlier)
            except (AutocpuError, RuntimeError) as error:
                say(f"{run_id}: FAILED: {error}")
                continue
            results["versions"] = current_versions(
                sorted({p for b in all_backends() for p in b.requires})
            )
            save(results, path)
            say(f"{run_id}: done")


if __name__ == "__main__":
    sys.exit(main())
