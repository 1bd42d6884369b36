"""BetterTransformer (optimum < 2.0): fused encoder layers on nested tensors, fp32 or bf16.

optimum 2.0 has no BetterTransformer and optimum 1.24+ refuses it with transformers >= 4.49;
where it is unavailable, native SDPA attention (``attention=sdpa`` in the eager backend) is its
successor. Its encoder fast path skips padded tokens, so their outputs differ (zeros); the
accuracy gate compares real tokens only. It refuses models built with SDPA attention, so
candidates start from an eager one.
"""

from __future__ import annotations

import functools
import importlib.metadata
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from autocpu.backends.base import Availability, Backend, BuildContext
from autocpu.backends.eager import AtPrecision, with_attention
from autocpu.errors import one_line

if TYPE_CHECKING:
    import optuna

    from autocpu.hardware import CpuInfo
    from autocpu.models import ModelSpec

SUCCESSOR = "native SDPA attention (attention=sdpa in the eager backend) is its successor"
LEGACY_FIX = (
    f"{SUCCESSOR}; for BetterTransformer itself: pip install 'autocpu[bettertransformer]' "
    "'transformers<4.49' in an environment of its own (ci/legacy_lane.sh builds one)"
)


@functools.lru_cache(maxsize=1)
def import_problem() -> str | None:
    """Why ``optimum.bettertransformer`` does not import here, or None when it does.

    optimum 2.x has no such module; 1.24+ raises RuntimeError under transformers >= 4.49; and
    ``PreTrainedModel.to_bettertransformer`` exists either way, so only importing tells.
    """
    try:
        import optimum.bettertransformer  # noqa: F401
    except Exception as error:
        return one_line(error, 160)
    return None


def unsupported_model_type(model_type: str) -> str | None:
    """Why optimum's BetterTransformer cannot transform this model type, or None if it can."""
    from optimum.bettertransformer import BetterTransformerManager

    if BetterTransformerManager.supports(model_type):
        return None
    why = BetterTransformerManager.CAN_NOT_BE_SUPPORTED.get(model_type, "not in its model mapping")
    return f"BetterTransformer does not support model type {model_type!r} ({why})"


class BetterTransformerBackend(Backend):
    name = "bettertransformer"
    description = "optimum BetterTransformer (optimum < 2): fused encoder layers, fp32/bf16"
    simplicity = 2
    requires = ("optimum",)
    extra = "bettertransformer"

    def availability(self, spec: ModelSpec | None, hw: CpuInfo) -> Availability:
        missing = self.missing_packages()
        if missing is not None:
            return Availability.no(missing.reason, LEGACY_FIX)
        problem = import_problem()
        if problem is not None:
            version = importlib.metadata.version("optimum")
            return Availability.no(
                f"optimum {version} no longer provides BetterTransformer ({problem})", LEGACY_FIX
            )
        reason = unsupported_model_type(spec.model_type) if spec is not None else None
        return Availability.no(reason, SUCCESSOR) if reason else Availability.yes()

    def defaults(self, hw: CpuInfo) -> dict[str, Any]:
        return {"precision": "fp32", "threads": hw.usable_cpus}

    def lossy_defaults(self, spec: ModelSpec, hw: CpuInfo) -> list[dict[str, Any]]:
        return [{**self.defaults(hw), "precision": "bf16"}] if hw.native_bf16 else []

    def suggest(
        self,
        trial: optuna.Trial,
        spec: ModelSpec,
        hw: CpuInfo,
        *,
        lossy: bool = True,
        int4: bool = False,
    ) -> dict[str, Any]:
        precisions = ["fp32", "bf16"] if lossy and hw.native_bf16 else ["fp32"]
        return {
            "precision": trial.suggest_categorical(self.key("precision"), precisions),
            "threads": self.suggest_threads(trial, hw),
        }

    def build(self, spec: ModelSpec, params: Mapping[str, Any], ctx: BuildContext) -> Any:
        self.availability(spec, ctx.hw).check()
        from optimum.bettertransformer import BetterTransformer

        precision = params.get("precision", "fp32")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"unknown precision {precision!r}; expected 'fp32' or 'bf16'")
        module = BetterTransformer.transform(with_attention(spec.model, "eager"))
        if precision == "fp32":
            return module
        return AtPrecision(module.to(torch.bfloat16), autocast=False)
