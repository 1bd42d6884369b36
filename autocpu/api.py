"""``tune()`` and ``apply_plan()``: the two calls most users need."""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import psutil
import torch

from autocpu import sharing
from autocpu.accuracy import Tolerance
from autocpu.backends import Backend, BuildContext, all_backends, get_backend
from autocpu.backends.base import quiet_build_logs
from autocpu.canary import check_canary, save_canary
from autocpu.errors import AutocpuError
from autocpu.hardware import CpuInfo, probe
from autocpu.inputs import Batch, normalize_inputs, signature
from autocpu.isolation import IsolatedExecutor, WorkerJob
from autocpu.models import ModelSpec, make_spec
from autocpu.outputs import named_tensors
from autocpu.plans import Plan, PlanCache, current_versions, plan_key, versions_id
from autocpu.search import (
    SEARCH_STRATEGIES,
    Executor,
    ProgressCallback,
    Search,
    SearchResult,
    TrialRecord,
    TrialRunner,
    make_sampler,
    one_line,
)
from autocpu.storage import open_study
from autocpu.tuned import TunedModel, wrap

log = logging.getLogger(__name__)

DEFAULT_TRIALS = 20
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_TRIAL_TIMEOUT_S = 900.0


class AutocpuWarning(UserWarning):
    """Something the user should know that does not stop the call (e.g. a plan not reused)."""


def select_backends(names: list[str] | None) -> list[Backend]:
    if names is None:
        return all_backends()
    if isinstance(names, str) or not names:
        raise AutocpuError(
            f"backends must be a non-empty list of names, got {names!r}",
            f"pass e.g. backends=['eager', 'torchscript'] from {[b.name for b in all_backends()]}",
        )
    return [get_backend(name) for name in names]


def reference_outputs(spec: ModelSpec, batches: list[Batch]) -> list[Any]:
    """The fp32 eager outputs every candidate must match; also proves the inputs fit."""
    wrong = sorted({str(p.dtype) for p in spec.model.parameters() if p.dtype != torch.float32})
    if wrong:
        raise AutocpuError(
            f"the model's weights are {', '.join(wrong)}, not float32",
            "tune the fp32 model (model.float()): autocpu tries lower precisions itself",
        )
    try:
        with torch.inference_mode():
            return [spec.model(**batch) for batch in batches]
    except Exception as error:
        raise AutocpuError(
            f"the model rejected example_inputs ({one_line(error)})",
            "pass the inputs you call the model with, e.g. tokenizer(texts, return_tensors='pt')",
        ) from error


def _why_unusable(plan: Plan, hw: CpuInfo) -> str | None:
    if plan.machine.get("fingerprint") != hw.fingerprint():
        return "it was measured on another machine (fingerprint differs)"
    changed = plan.version_mismatches()
    if changed:
        return f"versions changed since it was measured ({', '.join(changed)})"
    return None


def _eligibility(
    backends: list[Backend], spec: ModelSpec, hw: CpuInfo
) -> tuple[list[Backend], list[TrialRecord]]:
    eligible, skipped = [], []
    for backend in backends:
        available = backend.availability(spec, hw)
        if available.ok:
            eligible.append(backend)
        else:
            reason = available.reason + (f" (fix: {available.fix})" if available.fix else "")
            skipped.append(TrialRecord(backend.name, {}, status="ineligible", reason=reason))
    return eligible, skipped


def _make_plan(
    key: str,
    spec: ModelSpec,
    batches: list[Batch],
    hw: CpuInfo,
    tolerance: Tolerance,
    backends: list[str] | None,
    result: SearchResult,
    skipped: list[TrialRecord],
    seconds: float,
    versions: dict[str, str],
) -> Plan:
    winner = result.winner
    return Plan(
        key=key,
        backend=winner.backend,
        params=winner.params,
        task=spec.task,
        model=spec.fingerprint,
        inputs=signature(batches),
        machine={**hw.to_dict(), "fingerprint": hw.fingerprint()},
        tolerance=tolerance.to_dict(),
        versions=versions,
        backends=backends,
        baseline=result.baseline.to_dict(),
        winner=result.winner_stats.to_dict(),
        speedup=result.speedup,
        speedup_iqr=list(result.speedup_iqr),
        accuracy=winner.accuracy or {},
        one_time_costs={
            "build_s": winner.build_s or 0.0,
            "first_call_s": winner.first_call_s or 0.0,
        },
        decision=result.decision,
        trials=[r.to_dict() for r in [*result.records, *skipped]],
        tune_seconds=seconds,
    )


def tune(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    tolerance: Tolerance | str | float | dict = "strict",
    n_trials: int | None = None,
    timeout: float | None = None,
    backends: list[str] | None = None,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    task: str | None = None,
    progress: ProgressCallback | None = None,
    isolation: str = "process",
    storage: str | None = None,
    trial_timeout: float = DEFAULT_TRIAL_TIMEOUT_S,
    memory_limit_gb: float | None = None,
    search: str = "tpe",
) -> TunedModel:
    """Find the fastest way to run ``model`` on this CPU within ``tolerance``.

    ``example_inputs``: one batch (dict of tensors or a tokenizer's BatchEncoding) or a list of
    batches; latency is one pass over all of them. A matching cached plan is reused without
    searching. Returns a drop-in model; ``.plan`` holds the evidence, ``.explain()`` the table.

    ``isolation="process"`` (default) builds and measures every candidate in a worker process,
    so a backend that crashes, hangs past ``trial_timeout`` or exceeds ``memory_limit_gb`` is a
    failed trial, not a dead process; ``"none"`` runs them here (faster, no protection). The
    study lives in ``storage`` (an Optuna URL, e.g. PostgreSQL shared by identical machines) or
    in a journal file in the cache: an interrupted tune resumes where it stopped.

    ``search="exhaustive"`` measures every point of the search space (Optuna's
    BruteForceSampler) instead of TPE's sample; with no ``n_trials``/``timeout`` it runs until
    the space is exhausted, which takes far longer: it is the benchmark's oracle.
    """
    tol = Tolerance.parse(tolerance)
    _check_options(n_trials, timeout, trial_timeout, memory_limit_gb, isolation, search)
    selected = select_backends(backends)
    spec = make_spec(model, task)
    batches = normalize_inputs(example_inputs)
    hw = probe()
    plans = PlanCache(Path(cache_dir) if cache_dir else None)
    key = plan_key(
        spec.fingerprint, signature(batches), hw.fingerprint(), tol.to_dict(), backends, search
    )
    if cache:
        cached = _cached_model(plans, key, spec, batches, hw) or _shipped_model(
            plans, key, spec, batches, hw
        )
        if cached is not None:
            return cached

    started = time.perf_counter()
    references = reference_outputs(spec, batches)
    busy = busy_percent()
    eligible, skipped = _eligibility(selected, spec, hw)
    ctx = BuildContext(hw, batches, plans.artifacts_dir(spec.fingerprint_id))
    trial_runner = TrialRunner(spec, batches, references, tol, ctx)
    executor = _executor(isolation, trial_runner, trial_timeout, memory_limit_gb)
    versions = current_versions(sorted({p for b in all_backends() for p in b.requires}))
    study_key = f"{key}-{versions_id(versions)}"
    study = (
        open_study(study_key, hw.fingerprint(), plans.root, storage, make_sampler(search))
        if cache or storage
        else open_study_in_memory(search)
    )
    budgeted = n_trials is not None or timeout is not None or search == "exhaustive"
    result = Search(
        executor,
        study,
        spec,
        eligible,
        hw,
        n_trials=n_trials if budgeted else DEFAULT_TRIALS,
        timeout=timeout if budgeted else DEFAULT_TIMEOUT_S,
        progress=progress,
        lossy=tol.admits_lossy,
        seeds=sharing.seeds(spec.fingerprint, hw.family_key()),
    ).run()
    seconds = time.perf_counter() - started
    plan = _make_plan(key, spec, batches, hw, tol, backends, result, skipped, seconds, versions)
    plan.measured_in = executor.mode
    plan.cpu_busy_percent = busy
    plan.study_trials = result.study_trials
    plan.search = search
    if cache:
        save_canary(plans.canary_path(key), batches[0], spec.model)
        plans.save(plan)
    runner, _ = trial_runner.runner(get_backend(plan.backend), plan.params)
    return wrap(spec.model, runner, plan, from_cache=False)


#: Other work above this share of the CPUs makes latencies noisy (2-thread PyTorch calls stalled
#: at 170-280 ms instead of 0.6 ms here while another test run shared the two cores).
BUSY_WARNING_PERCENT = 25.0


def busy_percent() -> float:
    """How busy the CPUs are with other work just before the search starts (this process idle)."""
    busy = psutil.cpu_percent(interval=0.3)
    if busy > BUSY_WARNING_PERCENT:
        warnings.warn(
            f"the CPUs were {busy:.0f}% busy with other work when the tune started: latencies "
            "will be noisy and the plan may not hold; tune on an otherwise idle machine",
            AutocpuWarning,
            stacklevel=3,
        )
    return busy


def _check_options(
    n_trials: int | None,
    timeout: float | None,
    trial_timeout: float,
    memory_limit_gb: float | None,
    isolation: str,
    search: str,
) -> None:
    if n_trials is not None and n_trials < 1:
        raise AutocpuError(f"n_trials={n_trials} is not positive", "pass n_trials >= 1")
    if timeout is not None and timeout <= 0:
        raise AutocpuError(f"timeout={timeout} is not positive", "pass a timeout in seconds > 0")
    if trial_timeout <= 0:
        raise AutocpuError(
            f"trial_timeout={trial_timeout} is not positive",
            "pass a per-trial timeout in seconds > 0",
        )
    if memory_limit_gb is not None and memory_limit_gb <= 0:
        raise AutocpuError(
            f"memory_limit_gb={memory_limit_gb} is not positive",
            "pass a limit in GiB > 0, or None for 80% of this machine's memory",
        )
    if isolation not in ("process", "none"):
        raise AutocpuError(
            f"isolation={isolation!r} is not known",
            "use 'process' (worker processes) or 'none' (in this process)",
        )
    if search not in SEARCH_STRATEGIES:
        raise AutocpuError(
            f"search={search!r} is not known",
            "use 'tpe' (a budgeted sample) or 'exhaustive' (every point of the space)",
        )


def _executor(
    isolation: str, trial_runner: TrialRunner, trial_timeout: float, memory_limit_gb: float | None
) -> Executor:
    """Worker processes unless asked otherwise or the model cannot be saved for them."""
    if isolation == "none":
        return trial_runner
    spec = trial_runner.spec
    import transformers

    from autocpu.backends.eager import current_attention

    model_class = type(spec.model).__name__
    if not hasattr(spec.model, "save_pretrained") or not hasattr(transformers, model_class):
        warnings.warn(
            f"{model_class} cannot be saved for worker processes: trials run in this process",
            AutocpuWarning,
            stacklevel=3,
        )
        return trial_runner
    job = WorkerJob(
        model_dir=str(spec.saved_copy(trial_runner.ctx.artifact_dir)),
        model_class=model_class,
        attention=current_attention(spec.model),
        task=spec.task,
        fingerprint=spec.fingerprint,
        batches=trial_runner.batches,
        references=[named_tensors(r) for r in trial_runner.references],
        tolerance=trial_runner.tolerance,
        artifact_dir=str(trial_runner.ctx.artifact_dir),
        default_threads=trial_runner.default_threads,
    )
    total = psutil.virtual_memory().total
    limit = int(memory_limit_gb * 2**30) if memory_limit_gb else int(total * 0.8)
    return IsolatedExecutor(job, trial_timeout, limit)


def open_study_in_memory(strategy: str) -> optuna.Study:
    return optuna.create_study(direction="minimize", sampler=make_sampler(strategy))


def _cached_model(
    plans: PlanCache, key: str, spec: ModelSpec, batches: list[Batch], hw: CpuInfo
) -> TunedModel | None:
    """The cached plan's model, if the plan exists, fits here, rebuilds and passes its canary
    (made from the fp32 model first if the plan came without one)."""
    plan = plans.load(key)
    if plan is None:
        return None
    reason = _why_unusable(plan, hw)
    tuned = None
    if reason is None:
        try:
            tuned = build_tuned(spec, plan, batches, plans, from_cache=True)
        except Exception as error:  # a plan that no longer builds is re-tuned, not fatal
            reason = f"it failed to rebuild ({one_line(error)})"
    if tuned is not None:
        canary = plans.canary_path(key)
        if not canary.exists():  # shared without it (GPT-2's logits are too big to ship)
            log.info("plan %s has no canary: made one from the model as given", key[:12])
            save_canary(canary, batches[0], spec.model)
        report = check_canary(canary, tuned, Tolerance(**plan.tolerance))
        if not report.passed:
            reason = f"it is stale: its canary failed ({'; '.join(report.failures[:2])})"
    if reason is not None:
        warnings.warn(
            f"cached plan {key[:12]} not used: {reason}; re-tuning", AutocpuWarning, stacklevel=3
        )
        return None
    return tuned


def _shipped_model(
    plans: PlanCache, key: str, spec: ModelSpec, batches: list[Batch], hw: CpuInfo
) -> TunedModel | None:
    """The tuning database's plan for exactly this key, installed in the cache and checked
    (versions, rebuild, canary) like a cached one."""
    shipped = sharing.shipped_plan(key)
    if shipped is None:
        return None
    sharing.install(plans, shipped)
    tuned = _cached_model(plans, key, spec, batches, hw)
    if tuned is not None:
        tuned.source = "tuning_db"
    return tuned


def build_tuned(
    spec: ModelSpec, plan: Plan, batches: list[Batch], plans: PlanCache, *, from_cache: bool
) -> TunedModel:
    """Rebuild a plan's winner for ``spec`` (no search, no measurement)."""
    backend = get_backend(plan.backend)
    ctx = BuildContext(probe(), batches, plans.artifacts_dir(spec.fingerprint_id))
    with quiet_build_logs():
        runner = backend.bind(backend.build(spec, plan.params, ctx), plan.params)
    return wrap(spec.model, runner, plan, from_cache=from_cache)


def load_plan(source: Plan | str | Path, cache_dir: str | Path | None = None) -> Plan:
    """A Plan object, a path to a plan JSON file, or a cached plan's key (prefix)."""
    if isinstance(source, Plan):
        return source
    path = Path(source)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise AutocpuError(f"no plan file at {path}", "pass a path written by autocpu")
        try:
            return Plan.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError) as error:
            raise AutocpuError(
                f"{path} is not a valid plan ({error})",
                "re-export it with 'autocpu plans show KEY --json'",
            ) from None
    return PlanCache(Path(cache_dir) if cache_dir else None).find(str(source))


def synthesize_from_signature(plan: Plan) -> list[Batch]:
    """Inputs with the plan's names, shapes and dtypes (ones for masks, zeros elsewhere)."""
    batches = []
    for batch in plan.inputs:
        made: Batch = {}
        for name, spec in batch.items():
            if "shape" not in spec:
                continue
            dtype = getattr(torch, spec["dtype"])
            fill = torch.ones if "mask" in name else torch.zeros
            made[name] = fill(spec["shape"], dtype=dtype)
        batches.append(made)
    return batches


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
    if spec.fingerprint["architecture"] != plan.model.get("architecture"):
        raise AutocpuError(
            f"plan {plan.key[:12]} is for {plan.model.get('architecture')}, "
            f"not {spec.fingerprint['architecture']}",
            "apply a plan made for this architecture, or run autocpu.tune()",
        )
    notes = []
    if spec.fingerprint != plan.model:
        notes.append("it was tuned on other weights or config")
    reason = _why_unusable(plan, probe())
    if reason:
        notes.append(reason)
    if notes:
        warnings.warn(f"plan {plan.key[:12]}: {'; '.join(notes)}", AutocpuWarning, stacklevel=2)
    batches = (
        normalize_inputs(example_inputs)
        if example_inputs is not None
        else synthesize_from_signature(plan)
    )
    plans = PlanCache(Path(cache_dir) if cache_dir else None)
    return build_tuned(spec, plan, batches, plans, from_cache=True)
