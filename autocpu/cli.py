"""The ``autocpu`` command: probe, tune, plans.

Errors the user can fix print one line (``autocpu: error: problem -- fix``) and exit 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Any

from autocpu.errors import AutocpuError


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    # markup off: "autocpu[onnxruntime]" is text; soft_wrap: long lines are not cut at 80 columns
    return Console(stderr=stderr, highlight=False, markup=False, soft_wrap=True)


# probe ------------------------------------------------------------------------------------------


def cmd_probe(args: argparse.Namespace) -> int:
    from autocpu.backends import all_backends
    from autocpu.hardware import probe
    from autocpu.probe_report import hints, machine_tables

    hw = probe()
    backends = {b.name: b.availability(None, hw) for b in all_backends()}
    if args.json:
        data = hw.to_dict()
        data["backends"] = {
            name: {"available": a.ok, "reason": a.reason, "fix": a.fix}
            for name, a in backends.items()
        }
        print(json.dumps(data, indent=2))
        return 0
    console = _console()
    for table in machine_tables(hw, backends):
        console.print(table)
    for hint in hints(hw, backends):
        console.print(f"hint: {hint}")
    return 0


# tune -------------------------------------------------------------------------------------------


def _verbose_logging() -> None:
    """--verbose: autocpu's own log (trials, decisions, debug tracebacks) on stderr."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logger = logging.getLogger("autocpu")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)


def cmd_tune(args: argparse.Namespace) -> int:
    from autocpu.api import tune
    from autocpu.inputs import synthesize_inputs
    from autocpu.models import load_model_dir
    from autocpu.options import from_cli
    from autocpu.progress_bar import TuneProgress
    from autocpu.report import generation_summary, load_note

    console = _console(stderr=args.json)  # with --json, stdout holds the JSON alone
    if args.verbose:
        _verbose_logging()
    model = load_model_dir(args.model_dir, args.task)
    inputs = synthesize_inputs(model, args.batch_size, args.seq_len, args.model_dir)
    if not args.quiet:
        console.print(
            f"tuning {type(model).__name__} from {args.model_dir} on inputs "
            f"{ {k: tuple(v.shape) for k, v in inputs.items()} }"
        )
    with TuneProgress(console, args.quiet) as progress:
        tuned = tune(model, inputs, **from_cli(args, progress=progress))
    plan = tuned.plan
    if args.json:
        source = {"source": tuned.source, "from_cache": tuned.from_cache}
        print(json.dumps({**source, **plan.to_dict()}, indent=2, sort_keys=True, default=str))
        return 0
    if tuned.from_cache:
        console.print(f"cached plan {plan.key[:12]} reused: no trial ran")
    print(tuned.explain())  # already rendered at its own width: no re-wrapping
    console.print(
        f"plan {plan.key[:12]}: {plan.backend} {plan.params} -> {plan.speedup:.2f}x "
        f"(IQR {plan.speedup_iqr[0]:.2f}-{plan.speedup_iqr[1]:.2f}) vs fp32 eager, "
        f"{_ms(plan.winner)} vs {_ms(plan.baseline)}"
    )
    for line in (generation_summary(plan), load_note(plan)):
        if line:
            console.print(line)
    return 0


def _ms(stats: Any) -> str:
    return f"{stats.median_ms:.2f} ms" if stats else "- ms"


# plans ------------------------------------------------------------------------------------------


def cmd_plans(args: argparse.Namespace) -> int:
    from autocpu.plans import PlanCache
    from autocpu.report import explain_table, plans_table

    if args.shipped:
        return _list_shipped(args)
    cache = PlanCache(args.cache_dir)
    if args.action in ("export", "import"):
        return _share(cache, args)
    if args.action == "list":
        plans = cache.all()
        if args.json:
            print(json.dumps([json.loads(p.to_json()) for p in plans], indent=2))
        elif not plans:
            print(f"no plans in {cache.plans_dir}")
        else:
            print(plans_table(plans))
        return 0
    if not args.key:
        raise AutocpuError(
            f"'plans {args.action}' needs a plan key", "run 'autocpu plans list' to see the keys"
        )
    plan = cache.find(args.key)
    if args.action == "show":
        print(plan.to_json() if args.json else explain_table(plan))
    elif args.action == "rm":
        print(f"removed {cache.remove(plan.key)}")
    elif args.action == "verify":
        return _verify(cache, plan, args.model)
    return 0


def _list_shipped(args: argparse.Namespace) -> int:
    """plans list --shipped: the tuning database's plans for this machine's fingerprint, the
    only ones a tune here can use without searching."""
    from autocpu.hardware import probe
    from autocpu.report import plans_table
    from autocpu.sharing import shipped_for, tuning_db_dir

    if args.action != "list":
        raise AutocpuError(
            f"--shipped goes with 'plans list', not 'plans {args.action}'",
            "run 'autocpu plans list --shipped'",
        )
    fingerprint = probe().fingerprint()
    plans = shipped_for(fingerprint)
    if args.json:
        print(json.dumps([json.loads(p.to_json()) for p in plans], indent=2))
    elif not plans:
        print(f"no shipped plans for this machine (fingerprint {fingerprint}) in {tuning_db_dir()}")
    else:
        print(plans_table(plans, title=f"shipped plans for this machine ({fingerprint})"))
    return 0


def _share(cache: Any, args: argparse.Namespace) -> int:
    """plans export [KEY] -o FILE, plans import FILE: one file moves plans between machines."""
    from pathlib import Path

    from autocpu.sharing import export_bundle, import_bundle

    if args.action == "export":
        if not args.output:
            raise AutocpuError(
                "'plans export' needs a file to write", "pass --output FILE (a key is optional)"
            )
        exported = export_bundle(cache, [args.key] if args.key else [], Path(args.output))
        print(f"exported {len(exported)} plan(s) to {args.output}")
        return 0
    if not args.key:
        raise AutocpuError(
            "'plans import' needs a bundle file", "pass the file 'autocpu plans export' wrote"
        )
    imported = import_bundle(cache, Path(args.key))
    print(f"imported {len(imported)} plan(s) into {cache.plans_dir}")
    return 0


def _verify(cache: Any, plan: Any, model_dir: str | None) -> int:
    """Rebuild the plan for the model and run its canary: 0 when it still holds, 1 if stale."""
    from autocpu.accuracy import Tolerance
    from autocpu.api import apply_plan
    from autocpu.canary import check_canary
    from autocpu.models import load_model_dir

    if not model_dir:
        raise AutocpuError(
            "'plans verify' needs the model the plan was tuned for", "pass --model MODEL_DIR"
        )
    tuned = apply_plan(load_model_dir(model_dir, plan.task), plan, cache_dir=cache.root)
    report = check_canary(cache.canary_path(plan.key), tuned, Tolerance(**plan.tolerance))
    verdict = "holds" if report.passed else "STALE: " + "; ".join(report.failures[:3])
    print(
        f"plan {plan.key[:12]} ({plan.backend}): {verdict} "
        f"(rel diff {report.max_rel:.1e}, cosine {report.min_cosine:.6f})"
    )
    return 0 if report.passed else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from autocpu.bench import bench, matching_plan, updated_plan
    from autocpu.inputs import normalize_inputs, synthesize_inputs
    from autocpu.models import load_model_dir
    from autocpu.plans import PlanCache

    cache = PlanCache(args.cache_dir)
    model = load_model_dir(args.model_dir, args.task)
    inputs = synthesize_inputs(model, args.batch_size, args.seq_len, args.model_dir)
    plan = (
        cache.find(args.plan)
        if args.plan
        else matching_plan(cache, model, normalize_inputs(inputs))
    )
    result = bench(
        model, inputs, plan, seconds=args.seconds, cache_dir=cache.root, isolation=args.isolation
    )
    print(result.summary())
    if args.update:
        print(f"updated {cache.save(updated_plan(result))}")
    return 0 if result.accuracy.passed else 1


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from autocpu.html_report import write_report
    from autocpu.plans import PlanCache

    path = write_report(PlanCache(args.cache_dir).find(args.key), Path(args.output))
    print(f"wrote {path}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from autocpu.plans import PlanCache
    from autocpu.report import explain_table

    print(explain_table(PlanCache(args.cache_dir).find(args.key)))
    return 0


# entry point ------------------------------------------------------------------------------------


def _add_input_shape(parser: argparse.ArgumentParser) -> None:
    """The shape of the inputs the CLI makes (from the folder's tokenizer, else its config)."""
    from autocpu.options import DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN

    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument(
        "--seq-len",
        "--prompt-len",
        dest="seq_len",
        type=int,
        default=DEFAULT_SEQ_LEN,
        help="tokens per input (the prompt length for generation)",
    )


def build_parser() -> argparse.ArgumentParser:
    from autocpu.options import BENCH_SECONDS, add_cli_flags

    parser = argparse.ArgumentParser(
        prog="autocpu", description="Make transformers models run as fast as they can on this CPU."
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    probe = sub.add_parser("probe", help="show this CPU and which backends can run here")
    probe.add_argument("--json", action="store_true", help="machine-readable output")
    probe.set_defaults(func=cmd_probe)

    tune = sub.add_parser("tune", help="search the fastest backend for a local model directory")
    tune.add_argument("model_dir", help="folder written by save_pretrained()")
    _add_input_shape(tune)
    add_cli_flags(tune)
    verbosity = tune.add_mutually_exclusive_group()
    verbosity.add_argument("--quiet", action="store_true", help="no progress, only the result")
    verbosity.add_argument("--verbose", action="store_true", help="also autocpu's debug log")
    tune.add_argument("--json", action="store_true", help="print the plan as JSON")
    tune.set_defaults(func=cmd_tune)

    plans = sub.add_parser("plans", help="list, show, verify, remove, export or import plans")
    plans.add_argument("action", choices=["list", "show", "verify", "rm", "export", "import"])
    plans.add_argument(
        "key",
        nargs="?",
        help="plan key or unique prefix (see 'plans list'); for import: the bundle file",
    )
    plans.add_argument("--json", action="store_true")
    plans.add_argument("--model", default=None, help="verify: the model directory")
    plans.add_argument("-o", "--output", default=None, help="export: the bundle file to write")
    plans.add_argument("--cache-dir", default=None)
    plans.add_argument(
        "--shipped",
        action="store_true",
        help="list: the plans shipped with autocpu for this machine, not the cache's",
    )
    plans.set_defaults(func=cmd_plans)

    explain = sub.add_parser("explain", help="every candidate a plan's search tried, and why")
    explain.add_argument("key", help="plan key or unique prefix (see 'plans list')")
    explain.add_argument("--cache-dir", default=None)
    explain.set_defaults(func=cmd_explain)

    bench = sub.add_parser("bench", help="measure a plan against fp32 eager, side by side")
    bench.add_argument("model_dir", help="folder written by save_pretrained()")
    bench.add_argument(
        "--plan", default=None, help="plan key (default: the newest for these inputs)"
    )
    bench.add_argument("--task", default=None)
    _add_input_shape(bench)
    bench.add_argument(
        "--seconds", type=float, default=BENCH_SECONDS, help="time for the alternating rounds"
    )
    bench.add_argument("--cache-dir", default=None)
    add_cli_flags(bench, only={"isolation"})
    bench.add_argument(
        "--update",
        action="store_true",
        help="store the figures measured in the plan (refused when measured under load)",
    )
    bench.set_defaults(func=cmd_bench)

    report = sub.add_parser("report", help="a self-contained HTML page (and PNGs) for a plan")
    report.add_argument("key", help="plan key or unique prefix (see 'plans list')")
    report.add_argument("-o", "--output", default=".", help="folder to write into")
    report.add_argument("--cache-dir", default=None)
    report.set_defaults(func=cmd_report)
    return parser


def _version() -> str:
    from autocpu import __version__

    return f"autocpu {__version__}"


def _print_warnings() -> None:
    """autocpu's warnings (a plan not reused, a corrupt file moved aside) as one line each on
    stderr; other libraries' warnings as Python shows them."""
    from autocpu.errors import AutocpuWarning

    show = warnings.showwarning

    def one_line(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, AutocpuWarning):
            print(f"autocpu: warning: {message}", file=sys.stderr)
        else:
            show(message, category, *args, **kwargs)

    warnings.showwarning = one_line


#: Loggers that warn when transformers imports torchao (it does on every model load once torchao
#: is installed) about things a CPU process never uses: torchao's CUDA kernels, and torch's
#: pytree about the enums torchao registers. Left on, they would precede every one-line error.
IMPORT_CHATTER = ("torchao", "torch.utils._pytree")


def _quiet_import_chatter() -> None:
    import logging

    for name in IMPORT_CHATTER:
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _print_warnings()
    _quiet_import_chatter()
    try:
        return int(args.func(args) or 0)
    except AutocpuError as error:
        print(f"autocpu: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autocpu: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
