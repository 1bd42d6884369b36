"""Plans that check themselves: a probe input and its reference outputs, kept with the plan.

On every cache hit the rebuilt model runs the probe input and must reproduce the kept fp32
reference within the plan's tolerance. A plan whose outputs drifted (a new library build, a
different CPU behind the same fingerprint) is stale: not used, and re-tuned.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from autocpu.accuracy import AccuracyReport, Tolerance
from autocpu.errors import one_line
from autocpu.outputs import named_tensors
from autocpu.plans import atomic_write
from autocpu.workloads import WORKLOADS, Workload

log = logging.getLogger(__name__)

#: A shared plan may come without its canary; tune() makes it from the model on first use.
NO_CANARY = "no canary (a shared plan may come without one): 'autocpu tune' on the model makes it"


def save_canary(path: Path, workload: Workload, model: Callable[..., Any]) -> None:
    """Keep the workload's probe input and the fp32 eager outputs for it, written atomically."""
    probe = workload.probe()
    with torch.inference_mode():
        (outputs,) = probe.run(model)
    kept = {
        "inputs": probe.batches[0],
        "outputs": named_tensors(outputs),
        "workload": probe.name,
        "settings": probe.settings(),
    }
    buffer = io.BytesIO()
    torch.save(kept, buffer)
    atomic_write(path, buffer.getvalue())


def check_canary(path: Path, model: Callable[..., Any], tolerance: Tolerance) -> AccuracyReport:
    """Run the kept probe through ``model``; a missing or unreadable canary fails the check."""
    try:
        kept = torch.load(path, weights_only=True)
        kind = WORKLOADS[kept.get("workload", "forward")]
        probe, reference = kind.restore([kept["inputs"]], kept.get("settings", {})), kept["outputs"]
        probe.use_references([reference])
    except FileNotFoundError:
        return AccuracyReport(failures=[NO_CANARY])
    except (
        OSError,
        RuntimeError,
        KeyError,
        EOFError,
        TypeError,
        AttributeError,
        pickle.UnpicklingError,
    ) as error:
        return AccuracyReport(failures=[f"canary unreadable ({one_line(error, 80)})"])
    with torch.inference_mode():
        outputs = probe.run(model)
    return probe.compare([reference], outputs, dataclasses.replace(tolerance, **PROBE_UNBOUNDED))


#: A probe generates a few tokens: too short a text for a perplexity (one token 0.45 nats less
#: likely in four makes it 1.12x), so the canary leaves that bound to the tune, which applied it
#: over the whole continuation, and checks the logits' bounds.
PROBE_UNBOUNDED = {"max_perplexity_ratio": None}


def why_stale(
    path: Path,
    tuned: Callable[..., Any],
    tolerance: Tolerance,
    workload: Workload,
    model: Callable[..., Any],
) -> str | None:
    """Why a rebuilt plan (``tuned``) must not be used, or None when its canary passes.

    A plan shared without its canary gets one made from ``model`` (the fp32 model the plan
    key pins, weights included) on ``workload``'s probe first, instead of a re-tune.
    """
    if not path.exists():
        log.info("plan %s has no canary: made one from the model as given", path.stem)
        save_canary(path, workload, model)
    report = check_canary(path, tuned, tolerance)
    if report.passed:
        return None
    return f"it is stale: its canary failed ({'; '.join(report.failures[:2])})"
