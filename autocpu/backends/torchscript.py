"""TorchScript: trace with the example inputs, freeze, optionally ``optimize_for_inference``.

Deprecated by PyTorch but still often faster than eager. Traces bake in shapes and control flow,
which is why the search re-checks the winner at a second sequence length. GPT-2 style models
trace only with the older SDPA mask function and without a KV cache (GUIDE 2b).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from autocpu.backends.base import Availability, Backend, BuildContext
from autocpu.outputs import OutputTemplate

if TYPE_CHECKING:
    import optuna

    from autocpu.hardware import CpuInfo
    from autocpu.models import ModelSpec

log = logging.getLogger(__name__)


class _TupleOutputs(torch.nn.Module):
    """Call the model with positional inputs, tuple outputs and no cache, so it traces."""

    def __init__(self, model: torch.nn.Module, names: tuple[str, ...], causal_lm: bool) -> None:
        super().__init__()
        self.model = model
        self.names = names
        self.extra = {"return_dict": False, **({"use_cache": False} if causal_lm else {})}

    def forward(self, *tensors: torch.Tensor) -> Any:
        return self.model(**dict(zip(self.names, tensors, strict=True)), **self.extra)


@contextlib.contextmanager
def traceable_masks() -> Iterator[None]:
    """Swap in the SDPA mask function that traces (the recent one uses vmap); restore after."""
    from transformers import masking_utils

    mapping = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    saved = masking_utils.sdpa_mask, mapping.get("sdpa")
    masking_utils.sdpa_mask = masking_utils.sdpa_mask_older_torch
    mapping["sdpa"] = masking_utils.sdpa_mask_older_torch
    try:
        yield
    finally:
        masking_utils.sdpa_mask = saved[0]
        if saved[1] is not None:
            mapping["sdpa"] = saved[1]


class TracedRunner:
    """Runs the traced graph for the traced input names; other calls go to the eager model."""

    def __init__(
        self, graph: Any, names: tuple[str, ...], template: OutputTemplate, fallback: Any
    ) -> None:
        self.graph = graph
        self.names = names
        self.template = template
        self.fallback = fallback
        self._warned = False

    def __call__(self, **inputs: Any) -> Any:
        if tuple(sorted(inputs)) != tuple(sorted(self.names)) or not all(
            isinstance(inputs[n], torch.Tensor) for n in self.names
        ):
            if not self._warned:
                log.warning(
                    "TorchScript graph was traced for inputs %s, called with %s: running eager",
                    list(self.names),
                    sorted(inputs),
                )
                self._warned = True
            return self.fallback(**inputs)
        return self.template.restore(self.graph(*(inputs[n] for n in self.names)))


def trace(spec: ModelSpec, batch: Mapping[str, Any], freeze: bool, optimize: bool) -> Any:
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    wrapper = _TupleOutputs(spec.model, tuple(tensors), spec.is_causal_lm).eval()
    with (
        torch.inference_mode(False),
        torch.no_grad(),
        traceable_masks(),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated, still works
        graph = torch.jit.trace(wrapper, tuple(tensors.values()), strict=False)
        if freeze:
            graph = torch.jit.freeze(graph)
            if optimize:
                graph = torch.jit.optimize_for_inference(graph)
    return graph, tuple(tensors)


class TorchScriptBackend(Backend):
    name = "torchscript"
    description = "TorchScript trace + freeze (+ optimize_for_inference)"
    simplicity = 1

    def availability(self, spec: ModelSpec | None, hw: CpuInfo) -> Availability:
        return Availability.yes()

    def defaults(self, hw: CpuInfo) -> dict[str, Any]:
        return {"freeze": True, "optimize": False, "threads": hw.usable_cpus}

    def suggest(
        self, trial: optuna.Trial, spec: ModelSpec, hw: CpuInfo, *, lossy: bool = True
    ) -> dict[str, Any]:
        freeze = trial.suggest_categorical(self.key("freeze"), [True, False])
        optimize = freeze and trial.suggest_categorical(self.key("optimize"), [True, False])
        return {"freeze": freeze, "optimize": optimize, "threads": self.suggest_threads(trial, hw)}

    def build(self, spec: ModelSpec, params: Mapping[str, Any], ctx: BuildContext) -> Any:
        batch = ctx.example_inputs[0]
        graph, names = trace(spec, batch, bool(params["freeze"]), bool(params.get("optimize")))
        with torch.inference_mode():
            extra = {"use_cache": False} if spec.is_causal_lm else {}
            template = OutputTemplate.of(spec.model(**batch, **extra))
        return TracedRunner(graph, names, template, fallback=spec.model)
