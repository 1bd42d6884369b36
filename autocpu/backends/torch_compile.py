"""torch.compile with Inductor: freezing and max-autotune on or off.

Compilation happens on the first call (15-25 s for bert-base, 6 s with a warm cache), so
the build makes that call and the search books it as a one-time cost. Inductor's cache goes into
autocpu's cache (unless the user set TORCHINDUCTOR_CACHE_DIR) so a reload compiles warm.

For generation the model's ``forward`` is compiled and ``generate()`` runs with a static KV
cache (``cache_implementation="static"``): a dynamic cache grows every step and would recompile
every step. transformers compiles on its own only on GPUs, so the build compiles here, with the
example prompts' lengths; a generate() of another total length sizes a new cache and compiles
again. On SmolLM2-135M (2 vCPUs) that took 70 s to 3 minutes per candidate and decoded no faster
than eager, so a generation tune tries this backend only when ``backends`` names it.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from autocpu.backends.base import Availability, Backend, BuildContext, have_cxx_compiler

if TYPE_CHECKING:
    import optuna

    from autocpu.hardware import CpuInfo
    from autocpu.models import ModelSpec


class TorchCompileBackend(Backend):
    name = "torch_compile"
    description = "torch.compile (Inductor): freezing, max-autotune"
    simplicity = 3
    generation_opt_in = (
        "not tried by default for generation: compiling generate() took ~3 minutes per "
        "candidate on SmolLM2-135M (2 vCPUs) and decoded no faster than eager"
    )

    def availability(self, spec: ModelSpec | None, hw: CpuInfo) -> Availability:
        if not have_cxx_compiler():
            return Availability.no(
                "no C++ compiler on PATH (Inductor generates C++ on CPU)",
                "install one, e.g. apt-get install g++",
            )
        return Availability.yes()

    def defaults(self, hw: CpuInfo) -> dict[str, Any]:
        return {"freezing": False, "max_autotune": False, "threads": hw.usable_cpus}

    def suggest(
        self,
        trial: optuna.Trial,
        spec: ModelSpec,
        hw: CpuInfo,
        *,
        lossy: bool = True,
        int4: bool = False,
    ) -> dict[str, Any]:
        return {
            "freezing": trial.suggest_categorical(self.key("freezing"), [False, True]),
            "max_autotune": trial.suggest_categorical(self.key("max_autotune"), [False, True]),
            "threads": self.suggest_threads(trial, hw),
        }

    def build(self, spec: ModelSpec, params: Mapping[str, Any], ctx: BuildContext) -> Any:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ctx.artifact_dir.parent / "inductor"))
        options = {
            "freezing": bool(params["freezing"]),
            "max_autotune": bool(params["max_autotune"]),
        }
        if spec.workload == "generate":
            return _compiled_generator(spec.model, options, ctx)
        compiled = torch.compile(spec.model, backend="inductor", options=options)
        with torch.inference_mode():
            compiled(**ctx.example_inputs[0])  # compile now: a one-time cost, not latency
        return compiled


def _compiled_generator(
    model: torch.nn.Module, options: dict[str, Any], ctx: BuildContext
) -> torch.nn.Module:
    """A shallow copy of ``model`` (same weights) with a compiled ``forward`` and a static KV
    cache, compiled by one generate() over the first example prompt with the workload's new
    tokens (a later generate() of that total length or less reuses the cache and the graph);
    the user's model stays as it was."""
    generator = copy.copy(model)
    generator.generation_config = copy.deepcopy(model.generation_config)
    generator.generation_config.cache_implementation = "static"
    generator.forward = torch.compile(model.forward, backend="inductor", options=options)
    with torch.inference_mode():
        new_tokens = ctx.max_new_tokens or 2
        generator.generate(
            **ctx.example_inputs[0], max_new_tokens=new_tokens, min_new_tokens=new_tokens
        )
    return generator
