"""Model outputs as named tensors, and back to the model's own output type.

Traced and compiled graphs return tuples; users and pipelines expect ``outputs.logits``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

#: Output fields that hold a KV cache: runners without a cache (traced graphs) do not return
#: them, and their values are compared through the logits they produce anyway.
CACHE_FIELDS = frozenset({"past_key_values"})


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
