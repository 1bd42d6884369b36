"""Intel Extension for PyTorch: ``ipex.optimize`` (fp32 or bf16), optionally traced and frozen.

IPEX is archived upstream and each release runs on exactly one torch minor (2.8 for the last
one); a mismatched IPEX dies on import with an AttributeError, so the versions are compared from
package metadata before anything imports it. Its gain is in bf16: on bert-base (batch 1, seq 128,
torch 2.8) bf16 + TorchScript runs ~2.7x faster than fp32 eager, while fp32 ``ipex.optimize`` is
no faster than eager.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from autocpu.backends.base import Availability, Backend, BuildContext
from autocpu.backends.eager import bf16_autocast
from autocpu.backends.torchscript import TracedRunner, output_template, trace

if TYPE_CHECKING:
    import optuna

    from autocpu.hardware import CpuInfo
    from autocpu.models import ModelSpec

DIST = "intel-extension-for-pytorch"
#: IPEX is archived: its last release, 2.8, needs torch 2.8.x.
IN_LEGACY_ENV = (
    "in a torch 2.8 environment (IPEX's last release needs torch 2.8.x; "
    "ci/legacy_lane.sh builds one)"
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def major_minor(version: str) -> str:
    """``"2.8.0+cpu"`` -> ``"2.8"``."""
    return ".".join(version.split("+")[0].split(".")[:2])


def torch_mismatch(ipex_version: str, torch_version: str) -> Availability | None:
    """Why this IPEX cannot run with this torch (IPEX x.y needs torch x.y), or None if it can."""
    if major_minor(ipex_version) == major_minor(torch_version):
        return None
    needed = major_minor(ipex_version)
    return Availability.no(
        f"{DIST} {ipex_version} needs torch {needed}.x, this process has torch {torch_version}",
        f"run it in a torch {needed} environment (ci/legacy_lane.sh builds one for 2.8) "
        f"or pip uninstall {DIST}",
    )


def dtypes_for(hw: CpuInfo, lossy: bool) -> list[str]:
    """bf16 only where the tolerance admits it and the CPU has native bf16 math."""
    return ["fp32", "bf16"] if lossy and hw.native_bf16 else ["fp32"]


class IpexBackend(Backend):
    name = "ipex"
    description = "Intel Extension for PyTorch: ipex.optimize fp32/bf16 (+ TorchScript)"
    simplicity = 4
    cannot_generate = "its candidates are TorchScript traces, which have no KV cache for generate()"
    requires = (DIST,)
    extra = "ipex"

    def availability(self, spec: ModelSpec | None, hw: CpuInfo) -> Availability:
        missing = self.missing_packages()
        if missing is not None:
            return Availability.no(missing.reason, f"{missing.fix} {IN_LEGACY_ENV}")
        mismatch = torch_mismatch(importlib.metadata.version(DIST), torch.__version__)
        return mismatch or Availability.yes()

    def defaults(self, hw: CpuInfo) -> dict[str, Any]:
        return {"dtype": "fp32", "torchscript": True, "threads": hw.usable_cpus}

    def lossy_defaults(self, spec: ModelSpec, hw: CpuInfo) -> list[dict[str, Any]]:
        return [{**self.defaults(hw), "dtype": "bf16"}] if hw.native_bf16 else []

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
            "dtype": trial.suggest_categorical(self.key("dtype"), dtypes_for(hw, lossy)),
            "torchscript": trial.suggest_categorical(self.key("torchscript"), [True, False]),
            "threads": self.suggest_threads(trial, hw),
        }

    def build(self, spec: ModelSpec, params: Mapping[str, Any], ctx: BuildContext) -> Any:
        self.availability(spec, ctx.hw).check()  # a mismatched IPEX dies on import
        import intel_extension_for_pytorch as ipex  # only here: it patches torch on import

        dtype = params.get("dtype", "fp32")
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {tuple(DTYPES)}")
        bf16 = dtype == "bf16"
        module = ipex.optimize(spec.model, dtype=DTYPES[dtype], inplace=False)
        eager: Callable[..., Any] = bf16_autocast(module) if bf16 else module
        if not params.get("torchscript", True):
            return eager
        batch = ctx.example_inputs[0]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            graph, names = trace(module, batch, spec.is_causal_lm, freeze=True)
        traced = TracedRunner(graph, names, output_template(spec, batch), fallback=eager)
        return bf16_autocast(traced) if bf16 else traced
