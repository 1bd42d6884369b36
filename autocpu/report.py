"""Human-readable tables of plans and trials (rich tables rendered to text)."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console
from rich.table import Table

from autocpu.measure import LatencyStats
from autocpu.plans import Plan
from autocpu.records import BASELINE, OK, AccuracyReport, GenerationStats, TrialRecord


def render(table: Table, width: int = 160) -> str:
    buffer = io.StringIO()
    Console(file=buffer, width=width, no_color=True, highlight=False, markup=False).print(table)
    return buffer.getvalue()


def format_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(params.items())) or "-"


def accuracy_cell(accuracy: AccuracyReport | None) -> str:
    if accuracy is None:
        return "-"
    if accuracy.missing:  # the numbers cover only what it returned: say what it did not
        return f"missing {', '.join(accuracy.missing)}"
    cell = f"rel {accuracy.max_rel:.1e} cos {accuracy.min_cosine:.5f}"
    if accuracy.min_argmax is not None:
        cell += f" argmax {accuracy.min_argmax:.3f}"
    if accuracy.perplexity_ratio is not None:
        cell += f" ppl {accuracy.perplexity_ratio:.3f}x"
    if accuracy.same_tokens is not None:
        cell += f" tokens {accuracy.same_tokens:.0%}"
    return cell


def generation_cells(stats: GenerationStats | None) -> tuple[str, str]:
    """TTFT and decode tokens/s, as table cells."""
    if stats is None:
        return "-", "-"
    return f"{stats.ttft_ms:.1f}", f"{stats.tokens_per_s:.1f}"


def generation_summary(plan: Plan) -> str | None:
    """One line of what a generation plan delivers, fp32 eager first; None for other plans."""
    base, won = plan.baseline_generation, plan.winner_generation
    if plan.workload != "generate" or base is None or won is None:
        return None
    return (
        f"generate() of {won.new_tokens} new tokens: fp32 eager {base.tokens_per_s:.1f} tokens/s "
        f"(TTFT {base.ttft_ms:.0f} ms, TPOT {base.tpot_ms:.1f} ms), {plan.backend} "
        f"{won.tokens_per_s:.1f} tokens/s (TTFT {won.ttft_ms:.0f} ms, TPOT {won.tpot_ms:.1f} ms)"
    )


def load_note(plan: Plan) -> str | None:
    """What a speedup measured under load means, or None for one measured on a quiet machine."""
    if not plan.measured_under_load:
        return None
    return (
        f"measured under load: other work used {plan.load_percent:.0f}% of the CPUs during the "
        "finals, so the speedup holds for a machine that busy; 'autocpu bench --update' "
        "re-measures it on a quiet one"
    )


def speedup_text(plan: Plan) -> str:
    return f"{plan.speedup:.2f}x" + (" (under load)" if plan.measured_under_load else "")


def workload_cell(plan: Plan) -> str:
    tokens = plan.workload_settings.get("max_new_tokens")
    return f"{plan.workload} {tokens}" if tokens else plan.workload


def speedup_cell(trial: TrialRecord, baseline: LatencyStats | None) -> str:
    """The finals' interleaved speedup, else ``~`` and the ratio of two separate medians."""
    if trial.speedup is not None:
        return f"{trial.speedup:.2f}x"
    if trial.latency and baseline:
        return f"~{baseline.median_ms / trial.median_ms:.2f}x"
    return "-"


def outcome(plan: Plan, trial: TrialRecord, winner: TrialRecord | None) -> str:
    if trial is winner:
        return f"WINNER: {plan.decision}"
    if trial.status != OK:
        return f"{trial.status}: {trial.reason}"
    if trial.is_baseline:
        return BASELINE
    baseline_ms = plan.baseline.median_ms if plan.baseline else float("nan")
    note = f" ({trial.reason})" if trial.reason else ""
    verdict = "slower than winner" if trial.median_ms < baseline_ms else "slower than baseline"
    return verdict + note


def perplexity_bound(tolerance: dict[str, Any]) -> str:
    """The tolerance's bound on generation perplexity, as a caption clause ("" when unbounded)."""
    bound = tolerance.get("max_perplexity_ratio")
    return f", perplexity <= {bound}x fp32's" if bound is not None else ""


def explain_table(plan: Plan) -> str:
    """Every candidate tried, the winner first, with the decision as a caption."""
    tol = plan.tolerance
    caption = (
        f"tolerance {tol.get('name', 'custom')}: relative diff <= {tol.get('max_rel')}, cosine >= "
        f"{tol.get('min_cosine')}, argmax >= {tol.get('min_argmax')}"
        f"{perplexity_bound(tol)}; speedups measured interleaved against the baseline, ~ marks "
        f"a separate measurement; {plan.measured_in}"
    )
    generates = plan.workload == "generate"
    summary = generation_summary(plan)
    if summary:
        caption = f"{summary}; {caption}"
    note = load_note(plan)
    if note:
        caption = f"{note}; {caption}"
    table = Table(title=f"autocpu plan {plan.key[:12]}", caption=caption, show_lines=False)
    columns = ["backend", "settings", "median ms", "IQR ms", "p90 ms", "speedup"]
    columns += ["TTFT ms", "tokens/s"] if generates else []
    for column in [*columns, "accuracy", "one-time s", "outcome"]:
        table.add_column(column, overflow="fold")
    winner = plan.winning_trial
    for trial in plan.ranked_trials():
        latency = trial.latency
        one_time = trial.one_time_s
        table.add_row(
            trial.backend,
            format_params(trial.params),
            f"{latency.median_ms:.2f}" if latency else "-",
            f"{latency.iqr_ms:.2f}" if latency else "-",
            f"{latency.p90_ms:.2f}" if latency else "-",
            speedup_cell(trial, plan.baseline),
            *(generation_cells(trial.generation) if generates else ()),
            accuracy_cell(trial.accuracy),
            f"{one_time:.1f}" if one_time is not None else "-",
            outcome(plan, trial, winner),
        )
    return render(table)


#: Inputs whose shape names a plan's input shape in ``plans list``, in order of preference.
_MAIN_INPUTS = ("input_ids", "pixel_values", "input_values", "input_features")


def inputs_cell(plan: Plan) -> str:
    """The first batch's main input shape, the batch count and every input name: two plans
    that differ only in an input (with and without ``token_type_ids``) read differently."""
    first = plan.inputs[0] if plan.inputs else {}
    main = next((name for name in _MAIN_INPUTS if "shape" in first.get(name, {})), None)
    shape = "x".join(str(d) for d in first[main]["shape"]) + " " if main else ""
    return f"{shape}({len(plan.inputs)} batch) {', '.join(sorted(first))}"


def plans_table(plans: list[Plan], title: str = "cached plans") -> str:
    table = Table(title=title)
    columns = ("key", "model", "task", "workload", "inputs", "backend", "speedup", "tolerance")
    for column in (*columns, "created"):
        table.add_column(column, overflow="fold")
    for plan in plans:
        table.add_row(
            plan.key[:12],
            plan.model.get("architecture", "?"),
            plan.task,
            workload_cell(plan),
            inputs_cell(plan),
            f"{plan.backend} {format_params(plan.params)}",
            speedup_text(plan),
            plan.tolerance.get("name", "custom"),
            plan.created,
        )
    return render(table, width=220)  # nine columns: a narrower table folds every cell
