"""torch.compile with Inductor: freezing and max-autotune on or off.

Compilation happens on the first call (15-25 s for bert-base, 6 s with a warm cache), so
the build makes that call and the search books it as a one-time cost. Inductor's cache goes into
autocpu's cache (unless the user set TORCHINDUCTOR_CACHE_DIR) so a reload compiles warm.
"""

from __future__ import annotations

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
        self, trial: optuna.Trial, spec: ModelSpec, hw: CpuInfo, *, lossy: bool = True
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
        compiled = torch.compile(spec.model, backend="inductor", options=options)
        with torch.inference_mode():
            compiled(**ctx.example_inputs[0])  # compile now: a one-time cost, not latency
        return compiled
