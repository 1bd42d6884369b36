"""TorchScript: trace with the example inputs, freeze, optionally ``optimize_for_inference``.

Deprecated by PyTorch but still often faster than eager. Traces bake in shapes and control flow,
which is why the search re-checks the winner at a second sequence length. GPT-2 style models
trace only with transformers' SDPA mask function for older torch (the current one uses
``vmap``, which the tracer cannot record) and without a KV cache (the cache is an object, not a
tensor a traced graph can return).
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
    """Swap in the SDPA mask function that traces (the recent one uses vmap); restore after.

    transformers before ``masking_utils`` (4.48 in the legacy lane) builds masks without vmap,
    so there is nothing to swap.
    """
    try:
        from transformers import masking_utils
    except ImportError:
        yield
        return
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

    #: A graph with fixed outputs (see :attr:`autocpu.backends.base.Runner.fixed_outputs`).
    fixed_outputs = True

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


def trace(
    module: torch.nn.Module,
    batch: Mapping[str, Any],
    causal_lm: bool,
    freeze: bool,
    optimize: bool = False,
) -> tuple[Any, tuple[str, ...]]:
    """Trace ``module`` (the user's model or a transformed copy, e.g. by IPEX) on ``batch``.

    Returns the graph and the input names it takes, in order. Enclosing autocast contexts
    apply: casts are recorded in the graph.
    """
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    wrapper = _TupleOutputs(module, tuple(tensors), causal_lm).eval()
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


def output_template(spec: ModelSpec, batch: Mapping[str, Any]) -> OutputTemplate:
    """The structure of the model's own outputs, which a traced graph's tuples are mapped to."""
    with torch.inference_mode():
        extra = {"use_cache": False} if spec.is_causal_lm else {}
        return OutputTemplate.of(spec.model(**batch, **extra))


class TorchScriptBackend(Backend):
    name = "torchscript"
    description = "TorchScript trace + freeze (+ optimize_for_inference)"
    simplicity = 1
    cannot_generate = (
        "a TorchScript trace has no KV cache: generate() would re-run the whole sequence for "
        "every new token"
    )

    def availability(self, spec: ModelSpec | None, hw: CpuInfo) -> Availability:
        return Availability.yes()

    def defaults(self, hw: CpuInfo) -> dict[str, Any]:
        return {"freeze": True, "optimize": False, "threads": hw.usable_cpus}

    def suggest(
        self,
        trial: optuna.Trial,
        spec: ModelSpec,
        hw: CpuInfo,
        *,
        lossy: bool = True,
        int4: bool = False,
    ) -> dict[str, Any]:
        freeze = trial.suggest_categorical(self.key("freeze"), [True, False])
        optimize = freeze and trial.suggest_categorical(self.key("optimize"), [True, False])
        return {"freeze": freeze, "optimize": optimize, "threads": self.suggest_threads(trial, hw)}

    def build(self, spec: ModelSpec, params: Mapping[str, Any], ctx: BuildContext) -> Any:
        batch = ctx.example_inputs[0]
        graph, names = trace(
            spec.model,
            batch,
            spec.is_causal_lm,
            bool(params["freeze"]),
            bool(params.get("optimize")),
        )
        return TracedRunner(graph, names, output_template(spec, batch), fallback=spec.model)
