"""PyTorch eager: attention implementation, threads, bf16, dynamic int8 and weight-only int8/int4.

SDPA attention is offered only to model classes that declare it (``_supports_sdpa``):
transformers refuses to build any other class with it. bf16 is offered only with native bf16
math (avx512_bf16 or AMX): elsewhere it runs ~2x slower than fp32. Dynamic int8 quantizes
Linear layers; GPT-2's Conv1D layers become Linear first, since ``quantize_dynamic`` leaves
them fp32 without a warning. For generation, where every new token reads every weight, torchao
(when installed, imported only to build) stores Linear weights in int8 per channel or in int4
groups with a float zero point (its CPU kernel's packed layout); activations stay float.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from autocpu.backends.base import Availability, Backend, BuildContext
from autocpu.errors import AutocpuError

if TYPE_CHECKING:
    import optuna

    from autocpu.hardware import CpuInfo
    from autocpu.models import ModelSpec

PRECISIONS = (
    "fp32",
    "bf16_autocast",
    "bf16_weights",
    "int8_dynamic",
    "int8_weights",
    "int4_weights",
)
#: Weights per scale and zero point of torchao's int4 weights.
INT4_GROUP_SIZES = (32, 64, 128)
#: The CPU int4 kernel packs output rows in tiles of this many.
INT4_TILE = 16


def torchao_installed() -> bool:
    """Weight-only int8/int4 needs torchao (found without importing it)."""
    return importlib.util.find_spec("torchao") is not None


def precisions_for(hw: CpuInfo, spec: ModelSpec | None = None, *, int4: bool = False) -> list[str]:
    """Precisions worth trying on this CPU; for ``spec``'s generation with torchao installed,
    weight-only int8 too, and int4 when the tolerance admits it (``int4``)."""
    offered = ["fp32"]
    if hw.native_bf16:
        offered += ["bf16_autocast", "bf16_weights"]
    offered.append("int8_dynamic")
    if spec is not None and spec.workload == "generate" and torchao_installed():
        offered += ["int8_weights", "int4_weights"] if int4 else ["int8_weights"]
    return offered


def attention_choices(model: torch.nn.Module) -> list[str]:
    """Attention implementations this model class supports, among the two worth trying on CPU.

    transformers builds a class with SDPA only when it sets ``_supports_sdpa`` (a class
    attribute, a property on some composite models); any class can run eager attention.
    """
    choices = ["eager"]
    if getattr(model, "_supports_sdpa", False):
        choices.append("sdpa")
    return choices


def preferred_attention(model: torch.nn.Module) -> str:
    """SDPA where the class supports it (transformers' own default), else eager."""
    return attention_choices(model)[-1]


def current_attention(model: torch.nn.Module) -> str:
    """The attention implementation the model was built with (``config._attn_implementation``,
    which transformers resolves at load time; eager for a model without a config)."""
    return str(getattr(getattr(model, "config", None), "_attn_implementation", None) or "eager")


def conv1d_to_linear(model: torch.nn.Module) -> None:
    """Replace transformers' Conv1D (GPT-2 family) with equivalent nn.Linear layers, in place."""
    from transformers.pytorch_utils import Conv1D

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                in_features, out_features = child.weight.shape
                linear = torch.nn.Linear(in_features, out_features)
                linear.weight.data = child.weight.data.t().contiguous()
                linear.bias.data = child.bias.data
                setattr(parent, name, linear)


def outputs_to_fp32(output: Any) -> Any:
    """Cast floating tensors of an output back to fp32: callers expect the model's dtype."""
    if isinstance(output, torch.Tensor):
        return output.float() if output.is_floating_point() else output
    if isinstance(output, Mapping):
        for key, value in output.items():
            if isinstance(value, torch.Tensor):
                output[key] = outputs_to_fp32(value)
        return output
    if isinstance(output, tuple):
        return type(output)(outputs_to_fp32(v) for v in output)
    return output


class AtPrecision:
    """A module run in bf16 (its weights cast, or under autocast), called and generating like
    the fp32 model: outputs come back in fp32, as callers expect the model's dtype.

    Other attributes (``generate``, ``generation_config``, ``config``) are the module's, so a
    traced graph, which has no ``generate``, still has none here.
    """

    def __init__(self, module: Callable[..., Any], *, autocast: bool) -> None:
        self.module = module
        self.autocast = autocast

    def _precision(self) -> contextlib.AbstractContextManager:
        if self.autocast:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def __call__(self, **inputs: Any) -> Any:
        with self._precision():
            return outputs_to_fp32(self.module(**inputs))

    def __getattr__(self, name: str) -> Any:
        if name in ("module", "autocast"):  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        found = getattr(self.module, name)
        if name != "generate":
            return found

        def generate(*args: Any, **kwargs: Any) -> Any:
            with self._precision():
                return found(*args, **kwargs)

        return generate


def bf16_autocast(fn: Callable[..., Any]) -> AtPrecision:
    return AtPrecision(fn, autocast=True)


def with_attention(model: torch.nn.Module, attention: str) -> torch.nn.Module:
    """A copy of ``model`` built with another attention implementation, same weights.

    Rebuilding from the config works for every model class, unlike ``set_attn_implementation``,
    which classes whose attention layers do not dispatch through ``ALL_ATTENTION_FUNCTIONS``
    (BERT in transformers 4.57) refuse: their implementation is chosen when they are built.
    """
    from transformers.modeling_utils import no_init_weights

    with no_init_weights():
        module = type(model)._from_config(
            copy.deepcopy(model.config), attn_implementation=attention
        )
    module.load_state_dict(model.state_dict())
    return module.eval()


def prepare_module(
    model: torch.nn.Module, attention: str, precision: str, group_size: int = 128
) -> torch.nn.Module:
    """The model as this candidate runs it; a copy whenever anything changes."""
    if attention == current_attention(model) and precision in ("fp32", "bf16_autocast"):
        return model
    if attention != current_attention(model):
        module = with_attention(model, attention)
    else:
        module = copy.deepcopy(model).eval()
    if precision == "bf16_weights":
        module = module.to(torch.bfloat16)
    elif precision == "int8_dynamic":
        conv1d_to_linear(module)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*quantize_per_tensor", category=UserWarning)
            module = torch.ao.quantization.quantize_dynamic(
                module, {torch.nn.Linear}, dtype=torch.qint8
            )
    elif precision in ("int8_weights", "int4_weights"):
        conv1d_to_linear(module)
        quantize_weights(module, precision, group_size)
    return module


def quantize_weights(module: torch.nn.Module, precision: str, group_size: int) -> None:
    """torchao weight-only quantization of every Linear, in place: int8 per output channel, or
    int4 in groups of ``group_size`` (a Linear whose width the group does not divide stays
    fp32). torchao's inductor settings are left alone: they are process-wide."""
    if not torchao_installed():
        raise AutocpuError(f"{precision} needs torchao", "pip install torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    if precision == "int8_weights":
        config: Any = Int8WeightOnlyConfig(set_inductor_config=False)
    else:
        if group_size not in INT4_GROUP_SIZES:
            raise AutocpuError(
                f"unknown group_size={group_size!r}", f"use one of {INT4_GROUP_SIZES}"
            )
        from torchao.prototype.quantization.int4.inference_workflow import (
            PrototypeInt4WeightOnlyConfig,
        )

        config = PrototypeInt4WeightOnlyConfig(group_size=group_size, set_inductor_config=False)
        quantize_(module, config, filter_fn=lambda m, _: packs_to_int4(m, group_size))
        return
    quantize_(module, config)


def packs_to_int4(module: torch.nn.Module, group_size: int) -> bool:
    """A Linear the CPU int4 kernel takes: groups that divide its input width, and an output
    width in its tiles of 16."""
    return (
        isinstance(module, torch.nn.Linear)
        and module.in_features % group_size == 0
        and module.out_features % INT4_TILE == 0
    )


def wrap_precision(module: torch.nn.Module, precision: str) -> Callable[..., Any]:
    if precision in ("bf16_autocast", "bf16_weights"):
        return AtPrecision(module, autocast=precision == "bf16_autocast")
    return module


class EagerBackend(Backend):
    name = "eager"
    description = (
        "PyTorch eager: attention implementation, threads, bf16, dynamic int8, weight-only "
        "int8/int4 (torchao) for generation"
    )
    simplicity = 0

    def availability(self, spec: ModelSpec | None, hw: CpuInfo) -> Availability:
        return Availability.yes()

    def defaults(self, hw: CpuInfo) -> dict[str, Any]:
        """What plain transformers runs: SDPA attention and fp32, on a thread per usable CPU.

        These name no model, so they say SDPA; for a class without SDPA :meth:`suggest` has no
        attention choice and runs eager, so this candidate, queued as a trial, still builds.
        """
        return {"attention": "sdpa", "precision": "fp32", "threads": hw.usable_cpus}

    def lossy_defaults(self, spec: ModelSpec, hw: CpuInfo) -> list[dict[str, Any]]:
        """bf16 weights (with native bf16) and dynamic int8, with the model's best attention."""
        lossy = [p for p in precisions_for(hw) if p in ("bf16_weights", "int8_dynamic")]
        base = {**self.defaults(hw), "attention": preferred_attention(spec.model)}
        return [{**base, "precision": precision} for precision in lossy]

    def int4_defaults(self, spec: ModelSpec, hw: CpuInfo) -> list[dict[str, Any]]:
        """torchao int4 weights in groups of 32: with its float zero point, the one 4-bit
        recipe that kept SmolLM2-135M's perplexity within the int4 bound (1.06x and 1.02x of
        fp32's on two prompts, where group 128 gave 1.26x and integer zero points did worse)."""
        if "int4_weights" not in precisions_for(hw, spec, int4=True):
            return []
        base = {**self.defaults(hw), "attention": preferred_attention(spec.model)}
        return [{**base, "precision": "int4_weights", "group_size": 32}]

    def suggest(
        self,
        trial: optuna.Trial,
        spec: ModelSpec,
        hw: CpuInfo,
        *,
        lossy: bool = True,
        int4: bool = False,
    ) -> dict[str, Any]:
        """Attention among what the class supports, precision among what the CPU runs well.

        A class without SDPA gets no attention parameter at all rather than a one-choice one:
        Optuna raises on a queued value outside the choices (the defaults' SDPA), and a
        parameter that cannot vary adds nothing to the search.
        """
        choices = attention_choices(spec.model)
        precisions = precisions_for(hw, spec, int4=int4) if lossy else ["fp32"]
        params = {
            "attention": (
                trial.suggest_categorical(self.key("attention"), choices)
                if len(choices) > 1
                else choices[0]
            ),
            "precision": trial.suggest_categorical(self.key("precision"), precisions),
            "threads": self.suggest_threads(trial, hw),
        }
        if params["precision"] == "int4_weights":
            params["group_size"] = trial.suggest_categorical(
                self.key("group_size"), list(INT4_GROUP_SIZES)
            )
        return params

    def build(self, spec: ModelSpec, params: Mapping[str, Any], ctx: BuildContext) -> Any:
        attention = params.get("attention", current_attention(spec.model))
        if attention not in attention_choices(spec.model):
            raise ValueError(f"{type(spec.model).__name__} does not support {attention} attention")
        precision = params.get("precision", "fp32")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
        group_size = params.get("group_size", 128)
        module = prepare_module(spec.model, attention, precision, group_size)
        return wrap_precision(module, precision)
