"""One plan as a self-contained HTML page: the evidence behind a tune, readable without autocpu.

The figures are PNGs written next to the page and also embedded as data URIs, so the single HTML
file can be mailed or attached to a CI run. matplotlib is imported only here and only when a
report is written, so ``import autocpu`` stays light and the dependency stays optional.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from autocpu import report_figures as figures
from autocpu.errors import AutocpuError
from autocpu.plans import Plan, atomic_write
from autocpu.report import (
    format_params,
    generation_summary,
    load_note,
    speedup_cell,
    workload_cell,
)
from autocpu.report_figures import REL_FLOOR, Row, pareto_front

__all__ = ["pareto_front", "write_report"]

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


def write_report(plan: Plan, out_dir: Path) -> Path:
    """Write ``out_dir/report-<key12>.html`` and its three PNG figures; return the HTML path."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise AutocpuError(
            "matplotlib is not installed, so no figures can be drawn",
            "pip install 'autocpu[report]'",
        ) from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"report-{plan.key[:12]}"
    rows = figures.rows(plan)
    images = {}
    for name, png in figures.draw(plan, rows).items():
        (out_dir / f"{stem}-{name}.png").write_bytes(png)
        images[name] = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    path = out_dir / f"{stem}.html"
    atomic_write(path, _page(plan, rows, images))
    return path


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
        ("workload", workload_cell(plan)),
        ("winner", f"{plan.backend} {format_params(plan.params)}"),
        ("speedup", f"{plan.speedup:.2f}x (IQR {low:.2f}-{high:.2f}) over the baseline"),
        ("winner median", f"{_num(plan.winner.median_ms if plan.winner else None)} ms"),
        ("baseline median", f"{_num(plan.baseline.median_ms if plan.baseline else None)} ms"),
        *([("generation", summary)] if (summary := generation_summary(plan)) else []),
        ("tolerance", _tolerance(plan.tolerance)),
        ("tune time", f"{plan.tune_seconds:.1f} s, {plan.study_trials} study trials"),
        ("measured in", plan.measured_in),
        *([("load", note)] if (note := load_note(plan)) else []),
        ("plan", f"{plan.key} created {plan.created}"),
    ]
    return (
        f"<h1>autocpu plan {_e(plan.key[:12])}: {_e(plan.model.get('architecture', '?'))}</h1>"
        f'<p class="decision">{_e(plan.decision)}</p>{_key_values(pairs)}'
    )


def _trial_row(row: Row, plan: Plan) -> str:
    trial, latency = row.trial, row.latency
    accuracy = trial.accuracy.measured if trial.accuracy else None
    cells = [
        (f"#{row.number}", True),
        (trial.backend, False),
        (format_params(trial.params), False),
        (_num(row.median), True),
        (_num(latency.p90_ms if latency else None), True),
        (speedup_cell(trial, plan.baseline), True),
        (_num(accuracy.max_rel if accuracy else None, ".2e"), True),
        (_num(accuracy.min_cosine if accuracy else None, ".6f"), True),
        (_num(accuracy.min_argmax if accuracy else None, ".3f"), True),
        (_num(accuracy.max_abs if accuracy else None, ".2e"), True),
        (_num(trial.one_time_s, ".2f"), True),
        ("winner" if row.is_winner else trial.status, False),
        (trial.reason, False),
    ]
    body = "".join(
        f"<td class='num'>{_e(text)}</td>" if num else f"<td>{_e(text)}</td>" for text, num in cells
    )
    classes = f"{trial.status} winner" if row.is_winner else trial.status
    return f'<tr class="{_e(classes)}">{body}</tr>'


def _trials_table(plan: Plan, rows: list[Row]) -> str:
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
    header = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join(_trial_row(row, plan) for row in rows)
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


def _page(plan: Plan, rows: list[Row], images: dict[str, str]) -> str:
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
