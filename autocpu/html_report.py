"""One plan as a self-contained HTML page: the evidence behind a tune, readable without autocpu.

The figures are PNGs written next to the page and also embedded as data URIs, so the single HTML
file can be mailed or attached to a CI run. matplotlib is imported only here and only when a
report is written, so ``import autocpu`` stays light and the dependency stays optional.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autocpu.errors import AutocpuError
from autocpu.plans import Plan, atomic_write
from autocpu.report import format_params

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Where a max relative difference of 0 is drawn on the log axis (log scales cannot show 0).
REL_FLOOR = 1e-9

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.winner { background: #fff3bf; font-weight: 600; }
tr.inaccurate { background: #fff0f0; } tr.failed, tr.ineligible { color: #777; }
#trials td:last-child { min-width: 18em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; max-width: 60em; }
.decision { font-size: 1.1em; padding: 0.5em; background: #eef6ff; border-left: 4px solid #39f; }
"""


@dataclass(frozen=True)
class _Row:
    """One trial with its number in the table, so figures can refer to it as ``#n``."""

    number: int
    trial: dict[str, Any]
    is_winner: bool

    @property
    def backend(self) -> str:
        return str(self.trial["backend"])

    @property
    def latency(self) -> dict[str, Any]:
        return self.trial.get("latency") or {}

    @property
    def median(self) -> float | None:
        return self.latency.get("median_ms")

    @property
    def max_rel(self) -> float | None:
        return (self.trial.get("accuracy") or {}).get("max_rel")


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


def write_report(plan: Plan, out_dir: Path) -> Path:
    """Write ``out_dir/report-<key12>.html`` and its three PNG figures; return the HTML path."""
    try:
        import matplotlib
    except ImportError:
        raise AutocpuError(
            "matplotlib is not installed, so no figures can be drawn",
            "pip install 'autocpu[report]'",
        ) from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"report-{plan.key[:12]}"
    rows = _rows(plan)
    with matplotlib.rc_context({"font.size": 9}):
        figures = {
            "latency": _latency_figure(plan, rows),
            "accuracy": _accuracy_figure(plan, rows),
            "one-time": _cost_figure(rows),
        }
    images = {}
    for name, png in figures.items():
        (out_dir / f"{stem}-{name}.png").write_bytes(png)
        images[name] = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    path = out_dir / f"{stem}.html"
    atomic_write(path, _page(plan, rows, images))
    return path


def _rows(plan: Plan) -> list[_Row]:
    """Trials as ``explain()`` orders them: the winner first, then the fastest."""

    def is_winner(trial: dict[str, Any]) -> bool:
        return trial["backend"] == plan.backend and trial["params"] == plan.params

    def order(trial: dict[str, Any]) -> tuple[bool, float]:
        return (not is_winner(trial), (trial.get("latency") or {}).get("median_ms", math.inf))

    ordered = sorted(plan.trials, key=order)
    return [_Row(n, trial, is_winner(trial)) for n, trial in enumerate(ordered, start=1)]


# --- figures -------------------------------------------------------------------------------


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


def _colors(rows: list[_Row]) -> dict[str, str]:
    """One colour per backend, the same in every figure."""
    names = sorted({row.backend for row in rows})
    return {name: f"C{i % 10}" for i, name in enumerate(names)}


def _literal(text: str) -> str:
    """Backend names from the plan drawn as typed: a ``$`` would otherwise start mathtext."""
    return text.replace("$", r"\$")


def _mark_winner(ax: Axes, x: float, y: float) -> None:
    ax.scatter([x], [y], marker="*", s=260, color="gold", edgecolors="black", zorder=5)


def _latency_figure(plan: Plan, rows: list[_Row]) -> bytes:
    """Median per measured candidate, one band per backend, fastest backend on top."""
    from matplotlib.lines import Line2D

    measured = [row for row in rows if row.median is not None]
    groups: dict[str, list[_Row]] = {}
    for row in sorted(measured, key=lambda r: r.median or 0.0):
        groups.setdefault(row.backend, []).append(row)
    colors = _colors(rows)
    figure = _new_figure(10, 1.6 + 0.7 * max(len(groups), 1))
    ax = figure.add_subplot()
    for y, (backend, members) in enumerate(groups.items()):
        for k, row in enumerate(members):
            dy = (k / (len(members) - 1) - 0.5) * 0.6 if len(members) > 1 else 0.0
            median = row.median or 0.0
            low = median - row.latency.get("min_ms", median)
            high = row.latency.get("p90_ms", median) - median
            hollow = bool(row.latency.get("stopped_early"))
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
    baseline = plan.baseline.get("median_ms")
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


def _accuracy_figure(plan: Plan, rows: list[_Row]) -> bytes:
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


def _cost_figure(rows: list[_Row]) -> bytes:
    """Build and first-call seconds: what choosing a candidate costs once per process start."""
    from matplotlib.patches import Patch

    built = [row for row in rows if row.trial.get("build_s") is not None]
    colors = _colors(rows)
    figure = _new_figure(10, 1.4 + 0.32 * max(len(built), 1))
    ax = figure.add_subplot()
    for y, row in enumerate(built):
        build = row.trial.get("build_s") or 0.0
        first = row.trial.get("first_call_s") or 0.0
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


# --- HTML ----------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _plain(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _num(value: float | None, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def _key_values(pairs: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in pairs)
    return f"<table>{body}</table>"


def _shapes(plan: Plan) -> str:
    batches = []
    for batch in plan.inputs:
        parts = [
            f"{name} {spec.get('dtype', '?')}[{'x'.join(str(d) for d in spec['shape'])}]"
            if "shape" in spec
            else f"{name}={spec.get('value', '?')}"
            for name, spec in batch.items()
        ]
        batches.append(", ".join(parts))
    return " | ".join(batches) or "-"


def _tolerance(tolerance: dict[str, Any]) -> str:
    limits = ", ".join(
        f"{k} {v}" for k, v in sorted(tolerance.items()) if k != "name" and v is not None
    )
    return f"{tolerance.get('name') or 'custom'} ({limits})"


def _header(plan: Plan) -> str:
    low, high = plan.speedup_iqr
    pairs = [
        ("model", f"{plan.model.get('architecture', '?')} ({plan.task})"),
        ("inputs", _shapes(plan)),
        ("winner", f"{plan.backend} {format_params(plan.params)}"),
        ("speedup", f"{plan.speedup:.2f}x (IQR {low:.2f}-{high:.2f}) over the baseline"),
        ("winner median", f"{_num(plan.winner.get('median_ms'))} ms"),
        ("baseline median", f"{_num(plan.baseline.get('median_ms'))} ms"),
        ("tolerance", _tolerance(plan.tolerance)),
        ("tune time", f"{plan.tune_seconds:.1f} s, {plan.study_trials} study trials"),
        ("measured in", plan.measured_in),
        ("plan", f"{plan.key} created {plan.created}"),
    ]
    return (
        f"<h1>autocpu plan {_e(plan.key[:12])}: {_e(plan.model.get('architecture', '?'))}</h1>"
        f'<p class="decision">{_e(plan.decision)}</p>{_key_values(pairs)}'
    )


def _speedup(row: _Row, baseline_ms: float | None) -> str:
    if row.trial.get("speedup") is not None:
        return f"{row.trial['speedup']:.2f}x"
    if row.median and baseline_ms:
        return f"~{baseline_ms / row.median:.2f}x"
    return "-"


def _trial_row(row: _Row, baseline_ms: float | None) -> str:
    trial, latency, accuracy = row.trial, row.latency, row.trial.get("accuracy") or {}
    one_time = None
    if trial.get("build_s") is not None:
        one_time = trial["build_s"] + (trial.get("first_call_s") or 0.0)
    status = str(trial.get("status", "?"))
    cells = [
        (f"#{row.number}", True),
        (trial["backend"], False),
        (format_params(trial.get("params") or {}), False),
        (_num(row.median), True),
        (_num(latency.get("p90_ms")), True),
        (_speedup(row, baseline_ms), True),
        (_num(accuracy.get("max_rel"), ".2e"), True),
        (_num(accuracy.get("min_cosine"), ".6f"), True),
        (_num(accuracy.get("min_argmax"), ".3f"), True),
        (_num(accuracy.get("max_abs"), ".2e"), True),
        (_num(one_time, ".2f"), True),
        ("winner" if row.is_winner else status, False),
        (trial.get("reason") or "", False),
    ]
    body = "".join(
        f"<td class='num'>{_e(text)}</td>" if num else f"<td>{_e(text)}</td>" for text, num in cells
    )
    classes = f"{status} winner" if row.is_winner else status
    return f'<tr class="{_e(classes)}">{body}</tr>'


def _trials_table(plan: Plan, rows: list[_Row]) -> str:
    head = (
        "#",
        "backend",
        "settings",
        "median ms",
        "p90 ms",
        "speedup",
        "max rel",
        "min cosine",
        "min argmax",
        "max abs",
        "one-time s",
        "outcome",
        "reason",
    )
    baseline_ms = plan.baseline.get("median_ms")
    header = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join(_trial_row(row, baseline_ms) for row in rows)
    return f'<table id="trials"><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>'


MACHINE_FIELDS = (
    ("CPU", "brand"),
    ("vendor", "vendor"),
    ("architecture", "arch"),
    ("usable CPUs", "usable_cpus"),
    ("logical cores", "logical_cores"),
    ("physical cores", "physical_cores"),
    ("ISA flags", "flags"),
    ("native bf16", "native_bf16"),
    ("fast int8", "fast_int8"),
    ("AMX granted", "amx_granted"),
    ("fingerprint", "fingerprint"),
)


def _machine(machine: dict[str, Any]) -> str:
    """The fields that decide which backends win first, then every other probe field as is."""
    shown = {key for _, key in MACHINE_FIELDS}
    pairs = [(label, _plain(machine.get(key, "?"))) for label, key in MACHINE_FIELDS]
    pairs += [(key, value) for key, value in sorted(machine.items()) if key not in shown]
    return _key_values(pairs)


def _figure(image: str, name: str, alt: str, caption: str) -> str:
    return (
        f'<figure><img id="fig-{name}" src="{image}" alt="{_e(alt)}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _page(plan: Plan, rows: list[_Row], images: dict[str, str]) -> str:
    limit = plan.tolerance.get("max_rel")
    figures = [
        _figure(
            images["latency"],
            "latency",
            "median latency per candidate, grouped by backend",
            "Each dot is one measured candidate (#n is its row in the table below): its median, "
            "whiskers from the fastest run to the 90th percentile. Hollow dots stopped early: "
            "once clearly slower than the best so far they were not timed further. The dashed "
            "line is the baseline's median from the final interleaved run, the star the winner "
            "(its dot is from the search; the header's numbers are from the final run).",
        ),
        _figure(
            images["accuracy"],
            "accuracy",
            "max relative difference against median latency",
            "Left: candidates that passed the accuracy check and were timed. Right strip: "
            "candidates that failed it, so were never timed and have no latency; they are spread "
            "sideways only to be legible. The dotted line is the tolerance's max_rel "
            f"({_e(limit)}); a candidate under it can still fail on cosine or argmax. Ringed "
            "points joined by the staircase are the Pareto front: no other timed candidate is "
            f"both faster and closer. A difference of 0 is drawn at {REL_FLOOR:g}.",
        ),
        _figure(
            images["one-time"],
            "one-time",
            "build and first-call seconds per candidate",
            "Paid once per process: building (export, compile, quantize; 0 when a cached build "
            "was reused) and the first call (lazy initialisation). Candidates that failed before "
            "building have no bar.",
        ),
    ]
    versions = _key_values(sorted(plan.versions.items()))
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>autocpu report {_e(plan.key[:12])}</title><style>{CSS}</style></head><body>"
        f"{_header(plan)}<h2>Figures</h2>{''.join(figures)}"
        f"<h2>Every trial</h2>{_trials_table(plan, rows)}"
        f"<h2>Machine</h2>{_machine(plan.machine)}<h2>Versions</h2>{versions}"
        "</body></html>\n"
    )
