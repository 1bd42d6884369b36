"""The suite's JSON as a markdown table (with the issue's targets checked) and a PNG chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: Column order in the summary and chart.
ORDER = (
    "eager",
    "eager_attention",
    "torchscript",
    "torch_compile",
    "ort",
    "openvino",
    "openvino_f32",
    "autocpu_strict",
    "autocpu_bf16",
    "autocpu_int8",
    "oracle_strict",
)
SHORT = {
    "eager": "fp32 eager",
    "eager_attention": "eager attn",
    "torchscript": "TorchScript",
    "torch_compile": "compile",
    "ort": "ORT",
    "openvino": "OV",
    "openvino_f32": "OV f32",
    "autocpu_strict": "**autocpu strict**",
    "autocpu_bf16": "**autocpu bf16**",
    "autocpu_int8": "**autocpu int8**",
    "oracle_strict": "oracle strict",
}
#: Backends as the README's summary names them.
BACKEND_SHORT = {"onnxruntime": "ORT", "openvino": "OV", "torch_compile": "compile"}
TARGET_RUN = "bert-base/b1s128"
#: How a row's columns were timed: the suite's protocol, and the one rows measured before it
#: used (kept in the results, marked, never mixed in silently).
APART = "a warm process per column, alternating turns"
ONE_PROCESS = "one process for every column (biased: the runtimes disturb one another)"


def protocol(run: dict) -> str:
    return run.get("protocol", ONE_PROCESS)


def _old_mark(run: dict) -> str:
    return " (old protocol: one process)" if protocol(run) != APART else ""


def load_note(run: dict) -> str:
    if run.get("under_load"):
        return f"; **measured under load** (other work used {run['load_percent']:.0f}% of the CPUs)"
    discarded = run.get("rounds_discarded")
    return f"; {discarded} rounds under load discarded" if discarded else ""


#: Ratios closer than 3% are noise on a shared 2-vCPU machine: the same interleaved ratio varies
#: by that much between runs, so a plan within 3% of the best by-hand column counts as tied.
NOISE = 0.03


def _x(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}x"


def targets(run: dict) -> list[tuple[str, str, bool]]:
    """The issue's targets for bert-base b1 s128: (target, what was measured, met)."""
    cols = run["columns"]
    speed = {name: c.get("speedup") for name, c in cols.items()}
    checks: list[tuple[str, str, bool]] = []

    def check(label: str, name: str, minimum: float) -> None:
        value = speed.get(name)
        checks.append((label, _x(value), value is not None and value >= minimum))

    check("strict plan >= 1.4x", "autocpu_strict", 1.4)
    by_hand = [
        (c["speedup"], name)
        for name, c in cols.items()
        if c["kind"] == "by-hand" and c.get("strict_ok") and name != "eager"
    ]
    if by_hand and speed.get("autocpu_strict") is not None:
        best, best_name = max(by_hand)
        met = speed["autocpu_strict"] >= best * (1 - NOISE)
        checks.append(
            (
                "strict plan never slower than the best strict-accurate by-hand column",
                f"{_x(speed['autocpu_strict'])} vs {SHORT[best_name]} {_x(best)}",
                met,
            )
        )
    check("bf16 plan >= 2.5x", "autocpu_bf16", 2.5)
    check("int8 plan >= 4x", "autocpu_int8", 4.0)
    if speed.get("oracle_strict") and speed.get("autocpu_strict"):
        ratio = speed["autocpu_strict"] / speed["oracle_strict"]
        trials = cols["oracle_strict"].get("study_trials")
        checks.append(
            (
                "search within 5% of the oracle",
                f"{ratio:.1%} of the oracle's speed (oracle: {trials} trials)",
                ratio >= 0.95,
            )
        )
    tunes = [c["tune_s"] for c in cols.values() if c["kind"] == "autocpu" and "tune_s" in c]
    if tunes:
        checks.append(("tuning under 10 minutes", f"max {max(tunes):.0f} s", max(tunes) < 600))
    reloads = [c["reload_s"] for c in cols.values() if "reload_s" in c]
    if reloads:
        checks.append(("reload under 5 s", f"max {max(reloads):.2f} s", max(reloads) < 5))
    return checks


def _mb(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f} MB"


def _plan_cell(column: dict | None) -> str:
    if column is None:
        return "not run"
    if column.get("error"):
        return "failed"
    backend = column["backend"]
    return f"{_x(column['speedup'])} ({BACKEND_SHORT.get(backend, backend)})"


def summary(results: dict, shape: str) -> str:
    """The README's table for one shape: the baseline's latency, the best by-hand column that
    keeps fp32 outputs, OpenVINO's defaults, autocpu's plans and the oracle."""
    from benchmarks.zoo import MODELS  # torch and transformers: only for this table

    lines = [
        f"| model ({shape}) | fp32 eager | best by-hand, fp32-exact | OV defaults "
        "| autocpu strict | autocpu bf16 | autocpu int8 | oracle (strict) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    runs = [run for run in results["runs"].values() if run["shape"] == shape]
    for run in sorted(runs, key=lambda run: list(MODELS).index(run["model"])):
        cols = run["columns"]
        by_hand = [
            (c["speedup"], SHORT[name])
            for name, c in cols.items()
            if c["kind"] == "by-hand" and c.get("strict_ok") and name != "eager"
        ]
        fastest = max(by_hand, default=None)
        best = "—" if fastest is None else f"{_x(fastest[0])} ({fastest[1]})"
        ov = cols.get("openvino")
        cells = [
            f"{cols['eager']['median_ms']:.0f} ms",
            best,
            "failed" if ov is None or ov.get("error") else _x(ov["speedup"]),
            *(_plan_cell(cols.get(name)) for name in ORDER[-4:]),
        ]
        lines.append(f"| {run['model']}{_old_mark(run)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _run_table(run: dict, peaks: dict) -> list[str]:
    tuned = f" (autocpu's plans tuned {run['plans_tuned']})" if "plans_tuned" in run else ""
    lines = [
        f"### {run['model']}, batch {run['batch_size']}, seq {run['seq_len']}",
        "",
        f"{run['model_description']}; {run['gflop_per_call']:.3g} GFLOP per call; "
        f"{run['rounds']} rounds, {protocol(run)}{load_note(run)}; measured "
        f"{run['measured']}{tuned}; plain model "
        f"serving RSS {_mb(run.get('baseline_serving_rss_mb'))} (process peak, loading "
        f"included: {_mb(run.get('baseline_process_peak_rss_mb'))}).",
        "",
        "| column | median ms | speedup (IQR) | precision | GFLOP/s | of peak | max abs diff "
        "| cosine | one-time cost |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    columns = [run["columns"][name] for name in ORDER if name in run["columns"]]
    for c in columns:
        if c.get("error"):
            lines.append(f"| {c['label']} | failed: {c['error'][:90]} | | | | | | | |")
            continue
        fraction = c.get("fraction_of_peak")
        cost = f"setup {c['setup_s']:.1f} s, first call {c['first_call_s']:.2f} s"
        lines.append(
            f"| {c['label']} | {c['median_ms']:.1f} | {_x(c['speedup'])} "
            f"({c['speedup_iqr'][0]:.2f}-{c['speedup_iqr'][1]:.2f}) | {c['precision']} "
            f"| {c['gflops']:.0f} | {'—' if fraction is None else f'{fraction:.0%}'} "
            f"| {c['max_abs']:.1e} | {c['min_cosine']:.5f} | {cost} |"
        )
    plans = [c for c in columns if c["kind"] in ("autocpu", "oracle")]
    if plans:
        lines += [
            "",
            "| plan | winner | tune time | trials | tune peak RSS | reload | serving RSS "
            "| process peak RSS |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in plans:
            params = ", ".join(f"{k}={v}" for k, v in sorted(c["params"].items()))
            reload = f"{c['reload_s']:.2f} s" if "reload_s" in c else "—"
            lines.append(
                f"| {c['label']} | {c['backend']} ({params}) | {c['tune_s']:.0f} s "
                f"| {c['study_trials']} | {_mb(c.get('tune_peak_rss_mb'))} | {reload} "
                f"| {_mb(c.get('serving_rss_mb'))} | {_mb(c.get('process_peak_rss_mb'))} |"
            )
    return [*lines, ""]


def markdown(results: dict) -> str:
    machine, peaks = results["machine"], results["gemm_peaks"]
    versions = ", ".join(f"{k} {v}" for k, v in sorted(results.get("versions", {}).items()))
    lines = [
        f"# Benchmark results: {machine['brand']}",
        "",
        f"Machine fingerprint `{machine['fingerprint']}`, {machine['usable_cpus']} usable CPUs, "
        f"{results.get('threads')} torch threads. Versions: {versions}.",
        "",
        "Every ratio is a median of per-round ratios against fp32 eager (SDPA attention, as "
        "transformers loads the model), all columns of a row measured side by side in one run: "
        "each column built and kept warm in a process of its own, the columns taking "
        "alternating turns. Rows marked *old protocol* were measured before that, every "
        "column in one process, where the runtimes disturb one another's timings. "
        "Produced by `python -m benchmarks.run_suite`; see benchmarks/README.md.",
        "",
        "GEMM peak of this machine (best of "
        + ", ".join(next(iter(peaks.values()))["by_shape"])
        + "): "
        + ", ".join(f"{p} {v['gflops']:.0f} GFLOP/s" for p, v in peaks.items())
        + '. "Of peak" divides a column\'s achieved rate (FLOPs per call, counted, over its '
        "median latency) by the peak for its precision; above 100% means the engine's own GEMM "
        "kernels beat torch's on these shapes, so the measured peak is a floor of the physical "
        "limit rather than the limit itself.",
        "",
    ]
    runs = results["runs"]
    if TARGET_RUN in runs:
        lines += ["## Targets (bert-base, batch 1, seq 128)", "", "| target | measured | met |"]
        lines.append("|---|---|---|")
        lines += [
            f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in targets(runs[TARGET_RUN])
        ]
        lines.append("")
    lines += ["## Speedup over fp32 eager", ""]
    present = [n for n in ORDER if any(n in r["columns"] for r in runs.values())]
    lines.append("| model / shape | " + " | ".join(SHORT[n] for n in present) + " |")
    lines.append("|---|" + "---|" * len(present))
    for run_id, run in sorted(runs.items()):
        cells = []
        for name in present:
            c = run["columns"].get(name)
            cells.append("—" if c is None else "failed" if c.get("error") else _x(c["speedup"]))
        lines.append(f"| {run_id}{_old_mark(run)} | " + " | ".join(cells) + " |")
    lines += ["", "## Per model and shape", ""]
    for _, run in sorted(runs.items()):
        lines += _run_table(run, peaks)
    return "\n".join(lines)


def chart(results: dict, path: Path) -> None:
    """One horizontal bar panel per model and shape: speedup of every column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(results["runs"].items())
    colours = {"by-hand": "#9e9e9e", "autocpu": "#1f77b4", "oracle": "#ff7f0e"}
    figure, axes = plt.subplots(
        len(runs), 1, figsize=(8, 3.2 * len(runs)), squeeze=False, constrained_layout=True
    )
    for axis, (run_id, run) in zip(axes[:, 0], runs, strict=True):
        names = [n for n in ORDER if n in run["columns"] and not run["columns"][n].get("error")]
        values = [run["columns"][n]["speedup"] for n in names]
        axis.barh(
            [SHORT[n].strip("*") for n in names],
            values,
            color=[colours[run["columns"][n]["kind"]] for n in names],
        )
        axis.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
        axis.invert_yaxis()
        axis.set_title(f"{run_id}: speedup over fp32 eager{_old_mark(run)}", fontsize=10)
        for y, value in enumerate(values):
            axis.text(value, y, f" {value:.2f}x", va="center", fontsize=8)
        axis.set_xlim(0, max(values) * 1.18)
    figure.suptitle(results["machine"]["brand"], fontsize=11)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write(results: dict[str, Any], stem: Path) -> None:
    """``<stem>.md`` and ``<stem>.png`` from the results."""
    stem.with_suffix(".md").write_text(markdown(results) + "\n")
    chart(results, stem.with_suffix(".png"))


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="print the README's summary table for a shape")
    parser.add_argument("results", type=Path, help="benchmarks/results/<fingerprint>.json")
    parser.add_argument("--shape", default="b1s128")
    args = parser.parse_args()
    print(summary(json.loads(args.results.read_text()), args.shape))
