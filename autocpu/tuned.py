"""The drop-in model ``tune()`` returns: called like the original, backed by the plan's runner."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from autocpu.plans import Plan
from autocpu.report import explain_table


class TunedModel(torch.nn.Module):
    """Callable like the original model (same keyword inputs, same output type).

    Attributes it does not define (``config``, ``generate``, ``device``, ...) come from the
    original model, so it also works where the original did, e.g. in ``transformers.pipeline``.
    ``generate()`` runs on the original model's modules unless the plan's backend provides it.
    """

    def __init__(self, model: torch.nn.Module, runner: Any, plan: Plan, *, from_cache: bool):
        super().__init__()
        self.model = model
        self.runner = runner
        self.plan = plan
        self.from_cache = from_cache
        #: Where the plan came from: "search", "cache" or "tuning_db".
        self.source = "cache" if from_cache else "search"
        self._arg_names = _positional_names(model)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            kwargs.update(zip(self._arg_names, args, strict=False))
        return self.runner(**kwargs)

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
        source = {"search": "new plan", "cache": "cached plan"}.get(self.source, self.source)
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


def wrap(model: torch.nn.Module, runner: Any, plan: Plan, *, from_cache: bool) -> TunedModel:
    return tuned_class_for(type(model))(model, runner, plan, from_cache=from_cache)
