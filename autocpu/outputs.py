"""Model outputs as named tensors, and back to the model's own output type.

Traced and compiled graphs return tuples; users and pipelines expect ``outputs.logits``.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

import torch

#: Output fields that hold a KV cache: runners without a cache (traced graphs) do not return
#: them, and their values are compared through the logits they produce anyway.
CACHE_FIELDS = frozenset({"past_key_values"})

#: Keyword arguments that change what a model computes or returns. An exported graph (ONNX
#: Runtime, OpenVINO, a trace) has fixed inputs and outputs and would ignore them, so a tuned
#: model serves a call that sets one with the original model.
CALL_OPTIONS = (
    "labels",
    "output_hidden_states",
    "output_attentions",
    "inputs_embeds",
    "decoder_inputs_embeds",
    "head_mask",
    "decoder_head_mask",
    "cross_attn_head_mask",
)


def asked_options(kwargs: Mapping[str, Any]) -> list[str]:
    """The :data:`CALL_OPTIONS` a call sets (None and False leave the model's default)."""
    return [
        name for name in CALL_OPTIONS if kwargs.get(name) is not None and kwargs[name] is not False
    ]


def declared_output_type(model: Any) -> type | None:
    """The ModelOutput class ``model.forward`` declares it returns (transformers annotates
    every model's), or None when it declares none."""
    try:
        declared = typing.get_type_hints(type(model).forward).get("return")
    except Exception:  # unresolvable annotations: nothing declared
        return None
    for candidate in (*typing.get_args(declared), declared):
        if (
            isinstance(candidate, type)
            and is_dataclass(candidate)
            and issubclass(candidate, Mapping)
        ):
            return candidate
    return None


def as_output_type(output: Any, output_type: type | None) -> Any:
    """``output`` as an instance of ``output_type`` (the same fields, by name), so a runtime's
    output class (optimum's ``BaseModelOutputWithPooling``) reads as the model's own
    (``BaseModelOutputWithPoolingAndCrossAttentions``)."""
    if output_type is None or not isinstance(output, Mapping) or type(output) is output_type:
        return output
    names = {f.name for f in fields(output_type)}
    return output_type(**{k: v for k, v in output.items() if k in names})


def named_tensors(output: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Flatten a model output (ModelOutput, dict, tuple, tensor) into ``{name: tensor}``."""
    if isinstance(output, torch.Tensor):
        return {prefix or "output": output}
    if isinstance(output, Mapping):
        items = [(k, v) for k, v in output.items() if k not in CACHE_FIELDS]
    elif isinstance(output, (tuple, list)):
        items = [(str(i), v) for i, v in enumerate(output)]
    else:
        return {}
    found: dict[str, torch.Tensor] = {}
    for key, value in items:
        if value is None:
            continue
        found.update(named_tensors(value, f"{prefix}.{key}" if prefix else str(key)))
    return found


@dataclass(frozen=True)
class OutputTemplate:
    """The reference output's type and field order, to rebuild it from a traced tuple."""

    output_type: type | None
    keys: tuple[str, ...]

    @classmethod
    def of(cls, output: Any) -> OutputTemplate:
        if isinstance(output, Mapping):
            keys = tuple(k for k, v in output.items() if v is not None and k not in CACHE_FIELDS)
            return cls(type(output), keys)
        return cls(None, ())

    def restore(self, raw: Any) -> Any:
        """Turn a tuple from a traced graph into the model's output type."""
        if self.output_type is None or isinstance(raw, Mapping):
            return raw
        values = raw if isinstance(raw, (tuple, list)) else (raw,)
        return self.output_type(**dict(zip(self.keys, values, strict=False)))
