"""Human-readable tables of plans and trials (rich tables rendered to text)."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console
from rich.table import Table

from autocpu.plans import Plan


def render(table: Table, width: int = 160) -> str:
    buffer = io.StringIO()
    Console(file=buffer, width=width, no_color=True, highlight=False, markup=False).print(table)
    return buffer.getvalue()


def format_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(params.items())) or "-"


def _accuracy_cell(accuracy: dict[str, Any] | None) -> str:
    if not accuracy:
        return "-"
    cell = f"rel {accuracy['max_rel']:.1e} cos {accuracy['min_cosine']:.5f}"
    if accuracy.get("min_argmax") is not None:
        cell += f" argmax {accuracy['min_argmax']:.3f}"
    return cell


def _outcome(trial: dict[str, Any], is_winner: bool, baseline_ms: float, decision: str) -> str:
    if is_winner:
        return f"WINNER: {decision}"
    status = trial["status"]
    if status == "ok":
        if trial.get("reason") == "baseline":
            return "baseline"
        median = (trial.get("latency") or {}).get("median_ms", float("inf"))
        note = f" ({trial['reason']})" if trial.get("reason") else ""
        verdict = "slower than winner" if median < baseline_ms else "slower than baseline"
        return verdict + note
    return f"{status}: {trial.get('reason', '')}"


def _is_winner(plan: Plan, trial: dict[str, Any]) -> bool:
    return trial["backend"] == plan.backend and trial["params"] == plan.params


def explain_table(plan: Plan) -> str:
    """Every candidate tried, the winner first, with the decision as a caption."""
    baseline_ms = plan.baseline.get("median_ms", float("nan"))
    tol = plan.tolerance
    caption = (
        f"tolerance {tol.get('name', 'custom')}: relative diff <= {tol.get('max_rel')}, cosine >= "
        f"{tol.get('min_cosine')}, argmax >= {tol.get('min_argmax')}; speedups measured "
        f"interleaved against the baseline, ~ marks a separate measurement; {plan.measured_in}"
    )
    table = Table(title=f"autocpu plan {plan.key[:12]}", caption=caption, show_lines=False)
    for column in (
        "backend",
        "settings",
        "median ms",
        "IQR ms",
        "p90 ms",
        "speedup",
        "accuracy",
        "one-time s",
        "outcome",
    ):
        table.add_column(column, overflow="fold")
    trials = sorted(plan.trials, key=lambda t: (not _is_winner(plan, t), _median(t)))
    for trial in trials:
        latency = trial.get("latency") or {}
        median = latency.get("median_ms")
        if trial.get("speedup") is not None:
            speedup = f"{trial['speedup']:.2f}x"
        elif median:
            speedup = f"~{baseline_ms / median:.2f}x"
        else:
            speedup = "-"
        one_time = (trial.get("build_s") or 0.0) + (trial.get("first_call_s") or 0.0)
        table.add_row(
            trial["backend"],
            format_params(trial["params"]),
            f"{median:.2f}" if median else "-",
            f"{latency['iqr_ms']:.2f}" if latency else "-",
            f"{latency['p90_ms']:.2f}" if latency else "-",
            speedup,
            _accuracy_cell(trial.get("accuracy")),
            f"{one_time:.1f}" if trial.get("build_s") is not None else "-",
            _outcome(trial, _is_winner(plan, trial), baseline_ms, plan.decision),
        )
    return render(table)


def _median(trial: dict[str, Any]) -> float:
    return (trial.get("latency") or {}).get("median_ms", float("inf"))


def plans_table(plans: list[Plan]) -> str:
    table = Table(title="cached plans")
    for column in ("key", "model", "task", "inputs", "backend", "speedup", "tolerance", "created"):
        table.add_column(column, overflow="fold")
    for plan in plans:
        shapes = ", ".join(
            "x".join(str(d) for d in spec["shape"])
            for batch in plan.inputs[:1]
            for name, spec in batch.items()
            if name == "input_ids" and "shape" in spec
        )
        table.add_row(
            plan.key[:12],
            plan.model.get("architecture", "?"),
            plan.task,
            f"{shapes} ({len(plan.inputs)} batch)" if shapes else f"{len(plan.inputs)} batch",
            f"{plan.backend} {format_params(plan.params)}",
            f"{plan.speedup:.2f}x",
            plan.tolerance.get("name", "custom"),
            plan.created,
        )
    return render(table)
