"""The HTML report's three figures, drawn with matplotlib on its Agg canvas (no pyplot).

matplotlib is imported inside the functions, only when a report is written.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from autocpu.measure import LatencyStats
from autocpu.plans import Plan
from autocpu.records import TrialRecord

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Where a max relative difference of 0 is drawn on the log axis (log scales cannot show 0).
REL_FLOOR = 1e-9


@dataclass(frozen=True)
class Row:
    """One trial with its number in the table, so figures can refer to it as ``#n``."""

    number: int
    trial: TrialRecord
    is_winner: bool

    @property
    def backend(self) -> str:
        return self.trial.backend

    @property
    def latency(self) -> LatencyStats | None:
        return self.trial.latency

    @property
    def median(self) -> float | None:
        return self.latency.median_ms if self.latency else None

    @property
    def max_rel(self) -> float | None:
        accuracy = self.trial.accuracy.measured if self.trial.accuracy else None
        return accuracy.max_rel if accuracy else None


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (lower is better), by x.

    Equal points do not dominate each other, so duplicates on the front are all kept.
    """
    order = sorted(range(len(points)), key=lambda i: points[i])
    front: list[int] = []
    best_y = math.inf
    for i in order:
        if points[i][1] < best_y or (front and points[i] == points[front[-1]]):
            front.append(i)
            best_y = points[i][1]
    return front


def rows(plan: Plan) -> list[Row]:
    """Trials as ``explain()`` orders them: the winner first, then the fastest."""
    winner = plan.winning_trial
    ranked = plan.ranked_trials()
    return [Row(n, trial, trial is winner) for n, trial in enumerate(ranked, start=1)]


def _new_figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas, outside pyplot: no global state, no GUI backend touched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _colors(rows: list[Row]) -> dict[str, str]:
    """One colour per backend, the same in every figure."""
    names = sorted({row.backend for row in rows})
    return {name: f"C{i % 10}" for i, name in enumerate(names)}


def _literal(text: str) -> str:
    """Backend names from the plan drawn as typed: a ``$`` would otherwise start mathtext."""
    return text.replace("$", r"\$")


def _mark_winner(ax: Axes, x: float, y: float) -> None:
    ax.scatter([x], [y], marker="*", s=260, color="gold", edgecolors="black", zorder=5)


def _latency_figure(plan: Plan, rows: list[Row]) -> bytes:
    """Median per measured candidate, one band per backend, fastest backend on top."""
    from matplotlib.lines import Line2D

    measured = [row for row in rows if row.median is not None]
    groups: dict[str, list[Row]] = {}
    for row in sorted(measured, key=lambda r: r.median or 0.0):
        groups.setdefault(row.backend, []).append(row)
    colors = _colors(rows)
    figure = _new_figure(10, 1.6 + 0.7 * max(len(groups), 1))
    ax = figure.add_subplot()
    for y, (backend, members) in enumerate(groups.items()):
        for k, row in enumerate(members):
            dy = (k / (len(members) - 1) - 0.5) * 0.6 if len(members) > 1 else 0.0
            latency = row.latency
            median = latency.median_ms if latency else 0.0
            low = median - (latency.min_ms if latency else median)
            high = (latency.p90_ms if latency else median) - median
            hollow = bool(latency and latency.stopped_early)
            ax.errorbar(
                [median],
                [y + dy],
                xerr=[[max(low, 0.0)], [max(high, 0.0)]],
                fmt="o",
                color=colors[backend],
                markerfacecolor="white" if hollow else colors[backend],
                capsize=2,
            )
            ax.annotate(f"#{row.number}", (median, y + dy), (5, 3), textcoords="offset points")
            if row.is_winner:
                _mark_winner(ax, median, y + dy)
    handles = [
        Line2D([], [], marker="o", color="grey", label="median (whiskers: min to p90)"),
        Line2D([], [], marker="o", color="grey", markerfacecolor="white", label="stopped early"),
        Line2D([], [], marker="*", ls="", color="gold", mec="black", ms=14, label="winner"),
    ]
    baseline = plan.baseline.median_ms if plan.baseline else None
    if baseline:
        ax.axvline(baseline, color="black", ls="--", lw=1)
        handles.append(
            Line2D([], [], color="black", ls="--", label=f"baseline {baseline:.3g} ms (final)")
        )
    ax.set_yticks(range(len(groups)), [_literal(name) for name in groups])
    ax.set_ylim(len(groups) - 0.5, -0.5)
    ax.set_xscale("log")
    ax.set_xlabel("median ms per pass over the example batches (log scale)")
    ax.set_title("Latency of every measured candidate")
    ax.grid(axis="x", which="both", alpha=0.3)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    return _png(figure)


def _accuracy_figure(plan: Plan, rows: list[Row]) -> bytes:
    """Max relative difference against latency, with the tolerance and the Pareto front."""
    timed = [row for row in rows if row.median is not None and row.max_rel is not None]
    untimed = [row for row in rows if row.median is None and row.max_rel is not None]
    colors = _colors(rows)
    figure = _new_figure(10, 4.8)
    ax, side = figure.subplots(1, 2, sharey=True, width_ratios=[5, 1])
    for row in timed:
        x, y = row.median or 0.0, max(row.max_rel or 0.0, REL_FLOOR)
        ax.scatter([x], [y], color=colors[row.backend], label=_literal(row.backend), zorder=3)
        ax.annotate(f"#{row.number}", (x, y), (5, 3), textcoords="offset points")
        if row.is_winner:
            _mark_winner(ax, x, y)
    points = [(row.median or 0.0, max(row.max_rel or 0.0, REL_FLOOR)) for row in timed]
    front = [points[i] for i in pareto_front(points)]
    if front:
        xs, ys = zip(*front, strict=True)
        ax.step(xs, ys, where="post", color="black", lw=1, alpha=0.6, zorder=2)
        ax.scatter(xs, ys, s=170, facecolors="none", edgecolors="black", label="Pareto front")
    for i, row in enumerate(untimed):
        y = max(row.max_rel or 0.0, REL_FLOOR)
        side.scatter([i], [y], marker="x", s=60, color="crimson", zorder=3)
        side.annotate(f"#{row.number}", (i, y), (5, 3), textcoords="offset points")
    side.set_xlim(-0.7, max(len(untimed), 1) - 0.3)
    side.set_xticks([])
    side.set_xlabel("not timed")
    side.set_title("inaccurate" if untimed else "none inaccurate", fontsize=9)
    limit = plan.tolerance.get("max_rel")
    for axis in (ax, side):
        if limit:
            axis.axhline(limit, color="crimson", ls=":", lw=1.5, label="tolerance max_rel")
        axis.grid(alpha=0.3, which="major")
    ax.set_yscale("log")
    ax.set_ylim(bottom=REL_FLOOR / 3)
    ax.set_xscale("log")
    ax.set_xlabel("median ms (log scale)")
    ax.set_ylabel(f"max relative difference vs fp32 (0 drawn at {REL_FLOOR:g})")
    ax.set_title("Accuracy against latency")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))  # one entry per backend, not per dot
    ax.legend(unique.values(), unique.keys(), loc="best", fontsize=8)
    return _png(figure)


def _cost_figure(rows: list[Row]) -> bytes:
    """Build and first-call seconds: what choosing a candidate costs once per process start."""
    from matplotlib.patches import Patch

    built = [row for row in rows if row.trial.build_s is not None]
    colors = _colors(rows)
    figure = _new_figure(10, 1.4 + 0.32 * max(len(built), 1))
    ax = figure.add_subplot()
    for y, row in enumerate(built):
        build = row.trial.build_s or 0.0
        first = row.trial.first_call_s or 0.0
        color = colors[row.backend]
        ax.barh(y, build, color=color)
        ax.barh(y, first, left=build, color=color, alpha=0.4, hatch="//", edgecolor="black")
        ax.annotate(
            f"{build + first:.2f} s", (build + first, y), (4, -3), textcoords="offset points"
        )
    ax.set_yticks(range(len(built)), [_literal(f"#{row.number} {row.backend}") for row in built])
    ax.set_ylim(len(built) - 0.5, -0.5)
    ax.set_xlabel("seconds (build + first call)")
    ax.set_title("One-time cost of each candidate")
    ax.margins(x=0.12)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(
        handles=[
            Patch(color="grey", label="build"),
            Patch(facecolor="grey", alpha=0.4, hatch="//", edgecolor="black", label="first call"),
        ],
        loc="lower right",
        fontsize=8,
    )
    return _png(figure)


def draw(plan: Plan, rows: list[Row]) -> dict[str, bytes]:
    """The three figures as PNG bytes, by name."""
    import matplotlib

    with matplotlib.rc_context({"font.size": 9}):
        return {
            "latency": _latency_figure(plan, rows),
            "accuracy": _accuracy_figure(plan, rows),
            "one-time": _cost_figure(rows),
        }
