"""The drop-in model ``tune()`` returns: called like the original, backed by the plan's runner."""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

import torch

from autocpu.backends import BuildContext, get_backend
from autocpu.backends.base import quiet_build_logs
from autocpu.hardware import probe
from autocpu.models import ModelSpec
from autocpu.outputs import CALL_OPTIONS, as_output_type, asked_options, declared_output_type
from autocpu.plans import Plan, PlanCache
from autocpu.report import explain_table
from autocpu.workloads import Workload

log = logging.getLogger(__name__)

#: Where a tuned model's plan came from, as ``TunedModel.source`` says it.
SOURCES = {"search": "new plan", "cache": "cached plan", "tuning_db": "shipped plan"}


class TunedModel(torch.nn.Module):
    """Callable like the original model (same keyword inputs, same output type).

    Attributes it does not define (``config``, ``generation_config``, ``device``, ...) come
    from the original model, so it also works where the original did, e.g. in
    ``transformers.pipeline``. ``generate()`` (pipelines and streamers included) runs on the
    plan's engine with its KV cache; only a plan whose engine cannot generate (a traced graph)
    leaves it to the original model.
    """

    def __init__(self, model: torch.nn.Module, runner: Any, plan: Plan, *, source: str):
        super().__init__()
        self.model = model
        self.runner = runner
        self.plan = plan
        #: Where the plan came from: "search", "cache" or "tuning_db" (see SOURCES).
        self.source = source
        self._arg_names = _positional_names(model)
        self._output_type = declared_output_type(model)

    @property
    def from_cache(self) -> bool:
        """Whether the plan was reused (from the cache or the tuning database), not searched."""
        return self.source != "search"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The plan's engine on these inputs, returning the original's output class.

        A call setting an option an exported graph cannot honour (``labels``,
        ``output_hidden_states``, ... see :data:`autocpu.outputs.CALL_OPTIONS`) runs on the
        original model instead: the same answer the user would get untuned, never a silently
        different one (a missing ``loss``, absent hidden states).
        """
        if args:
            kwargs.update(zip(self._arg_names, args, strict=False))
        if not getattr(self.runner, "fixed_outputs", False):
            return self.runner(**kwargs)
        asked = asked_options(kwargs)
        if asked:
            log.debug("%s asked for: the original model serves this call", ", ".join(asked))
            return self.model(**kwargs)
        return_dict = kwargs.pop("return_dict", None)
        feed = {k: v for k, v in kwargs.items() if k not in CALL_OPTIONS}
        output = as_output_type(self.runner(**feed), self._output_type)
        if return_dict is None:
            return_dict = getattr(getattr(self.model, "config", None), "use_return_dict", True)
        return output if return_dict or not hasattr(output, "to_tuple") else output.to_tuple()

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        if getattr(self.runner, "can_generate", False):
            return self.runner.generate(*args, **kwargs)
        log.debug("plan %s cannot generate: generate() runs on the original model", self.plan.key)
        return self.model.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = super().__getattr__("model")
            return getattr(model, name)

    def explain(self) -> str:
        """Every candidate tried: latency, speedup, accuracy and why it lost (or won)."""
        return explain_table(self.plan)

    def __repr__(self) -> str:
        source = SOURCES.get(self.source, self.source)
        return f"TunedModel({type(self.model).__name__}, {self.plan.summary()}, {source})"


def _positional_names(model: torch.nn.Module) -> list[str]:
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


@functools.cache
def tuned_class_for(model_class: type) -> type[TunedModel]:
    """A TunedModel subclass named like the model class: pipelines check the class name."""
    return type(
        model_class.__name__,
        (TunedModel,),
        {"__module__": __name__, "__qualname__": model_class.__name__},
    )


def wrap(model: torch.nn.Module, runner: Any, plan: Plan, *, source: str) -> TunedModel:
    return tuned_class_for(type(model))(model, runner, plan, source=source)


def build_tuned(
    spec: ModelSpec, plan: Plan, workload: Workload, cache: PlanCache, *, source: str
) -> TunedModel:
    """Rebuild a plan's winner for ``spec`` (no search, no measurement)."""
    backend = get_backend(plan.backend)
    ctx = BuildContext(
        probe(),
        workload.batches,
        cache.artifacts_dir(spec.fingerprint_id),
        workload.settings().get("max_new_tokens"),
    )
    with quiet_build_logs():
        runner = backend.bind(backend.build(spec, plan.params, ctx), plan.params)
    return wrap(spec.model, runner, plan, source=source)
