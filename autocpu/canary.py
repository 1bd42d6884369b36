"""Plans that check themselves: a probe input and its reference outputs, kept with the plan.

On every cache hit the rebuilt model runs the probe input and must reproduce the kept fp32
reference within the plan's tolerance. A plan whose outputs drifted (a new library build, a
different CPU behind the same fingerprint) is stale: not used, and re-tuned.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from autocpu.accuracy import AccuracyReport, Tolerance, compare_outputs
from autocpu.outputs import named_tensors
from autocpu.plans import atomic_write

#: Rows of the first example batch kept as the probe (shapes stay what the plan was tuned on).
PROBE_ROWS = 2
#: A shared plan may come without its canary; tune() makes it from the model on first use.
NO_CANARY = "no canary (a shared plan may come without one): 'autocpu tune' on the model makes it"


def probe_batch(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v[:PROBE_ROWS].clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}


def save_canary(path: Path, batch: dict[str, Any], model: Callable[..., Any]) -> None:
    """Keep a probe input and the fp32 eager outputs for it, written atomically."""
    inputs = probe_batch(batch)
    with torch.inference_mode():
        outputs = named_tensors(model(**inputs))
    buffer = io.BytesIO()
    torch.save({"inputs": inputs, "outputs": outputs}, buffer)
    atomic_write(path, buffer.getvalue())


def check_canary(path: Path, model: Callable[..., Any], tolerance: Tolerance) -> AccuracyReport:
    """Run the kept probe through ``model``; a missing or unreadable canary fails the check."""
    try:
        kept = torch.load(path, weights_only=True)
        inputs, reference = kept["inputs"], kept["outputs"]
    except FileNotFoundError:
        return AccuracyReport(failures=[NO_CANARY])
    except (OSError, RuntimeError, KeyError, EOFError) as error:
        return AccuracyReport(failures=[f"canary unreadable ({type(error).__name__})"])
    with torch.inference_mode():
        outputs = model(**inputs)
    return compare_outputs(reference, outputs, tolerance, inputs.get("attention_mask"))
