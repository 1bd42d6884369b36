"""``tune()`` and ``apply_plan()``: the two calls most users need."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from autocpu.accuracy import Tolerance
from autocpu.errors import AutocpuError, AutocpuWarning
from autocpu.hardware import probe
from autocpu.inputs import normalize_inputs, synthesize_from_signature
from autocpu.models import make_spec
from autocpu.options import TuneOptions
from autocpu.plans import Plan, PlanCache, load_plan
from autocpu.search import ProgressCallback
from autocpu.tuned import TunedModel, build_tuned
from autocpu.tuning import Tuning
from autocpu.workloads import WORKLOADS, Generation, require_generate

__all__ = ["AutocpuWarning", "apply_plan", "load_plan", "tune"]

_DEFAULTS = TuneOptions()


def tune(
    model: torch.nn.Module,
    example_inputs: Any = None,
    *,
    tolerance: Tolerance | str | float | dict = _DEFAULTS.tolerance,
    n_trials: int | None = _DEFAULTS.n_trials,
    timeout: float | None = _DEFAULTS.timeout,
    backends: list[str] | None = _DEFAULTS.backends,
    cache: bool = _DEFAULTS.cache,
    cache_dir: str | Path | None = _DEFAULTS.cache_dir,
    task: str | None = _DEFAULTS.task,
    progress: ProgressCallback | None = _DEFAULTS.progress,
    isolation: str = _DEFAULTS.isolation,
    storage: str | None = _DEFAULTS.storage,
    trial_timeout: float = _DEFAULTS.trial_timeout,
    memory_limit_gb: float | None = _DEFAULTS.memory_limit_gb,
    search: str = _DEFAULTS.search,
    workload: str | None = _DEFAULTS.workload,
    max_new_tokens: int = _DEFAULTS.max_new_tokens,
) -> TunedModel:
    """Find the fastest way to run ``model`` on this CPU within ``tolerance``.

    ``example_inputs``: one batch (dict of tensors or a tokenizer's BatchEncoding) or a list of
    batches; latency is one pass over all of them. Without them the tune runs on made-up inputs
    (one row of 128 valid token ids, or one image) and says so: the plan then holds for that
    shape. A matching cached plan is reused without
    searching. Returns a drop-in model; ``.plan`` holds the evidence, ``.explain()`` the table.

    ``isolation="process"`` (default) builds and measures every candidate in a worker process,
    so a backend that crashes, hangs past ``trial_timeout`` or exceeds ``memory_limit_gb`` is a
    failed trial, not a dead process; ``"none"`` runs them here (faster, no protection). The
    study lives in ``storage`` (an Optuna URL, e.g. PostgreSQL shared by identical machines) or
    in a journal file in the cache: an interrupted tune resumes where it stopped.

    ``search="exhaustive"`` measures every point of the search space (Optuna's
    BruteForceSampler) instead of TPE's sample; with no ``n_trials``/``timeout`` it runs until
    the space is exhausted, which takes far longer: it is the benchmark's oracle.
    ``workload``: what is measured. A text-generation model (a causal LM) is tuned on greedy
    ``generate()`` of ``max_new_tokens`` new tokens from each example prompt (EOS ignored), what
    serving it waits for, and its plan serves ``generate()`` (pipelines and streamers included)
    on the plan's engine; ``"forward"`` tunes one forward pass per batch, as for every other
    model.
    Every option, its default and its validation: :class:`autocpu.options.TuneOptions`.
    """
    settings = {k: v for k, v in locals().items() if k not in ("model", "example_inputs")}
    return Tuning(model, example_inputs, TuneOptions(**settings)).run()


def apply_plan(
    model: torch.nn.Module,
    plan: Plan | str | Path,
    example_inputs: Any = None,
    *,
    cache_dir: str | Path | None = None,
) -> TunedModel:
    """Apply a saved plan to ``model`` without searching.

    Warns when the plan was made for other weights, another machine or other versions: its
    speed and accuracy were measured there, not here.
    """
    plan = load_plan(plan, cache_dir)
    spec = make_spec(model, plan.task)
    spec.workload = plan.workload
    if spec.fingerprint["architecture"] != plan.model.get("architecture"):
        raise AutocpuError(
            f"plan {plan.key[:12]} is for {plan.model.get('architecture')}, "
            f"not {spec.fingerprint['architecture']}",
            "apply a plan made for this architecture, or run autocpu.tune()",
        )
    notes = []
    if spec.fingerprint != plan.model:
        notes.append("it was tuned on other weights or config")
    reason = plan.why_unusable(probe().fingerprint())
    if reason:
        notes.append(reason)
    if notes:
        warnings.warn(f"plan {plan.key[:12]}: {'; '.join(notes)}", AutocpuWarning, stacklevel=2)
    if plan.workload not in WORKLOADS:
        raise AutocpuError(
            f"plan {plan.key[:12]} was tuned for an unknown workload {plan.workload!r}",
            "upgrade autocpu, or tune the model here with autocpu.tune()",
        )
    if plan.workload == Generation.name:
        require_generate(model, f"cannot serve plan {plan.key[:12]}, tuned for generate()")
    batches = (
        normalize_inputs(example_inputs)
        if example_inputs is not None
        else synthesize_from_signature(plan.inputs)
    )
    cache = PlanCache(Path(cache_dir) if cache_dir else None)
    workload = WORKLOADS[plan.workload].restore(batches, plan.workload_settings)
    return build_tuned(spec, plan, workload, cache, source="cache")
