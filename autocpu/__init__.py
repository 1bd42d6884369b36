"""autocpu: make transformers models run as fast as they can on this CPU.

``import autocpu`` stays light: heavy optional packages (onnxruntime, openvino, optimum) load
only inside their backends, and the search stack loads on first use of ``tune``.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

_EXPORTS = {
    "tune": "autocpu.api",
    "apply_plan": "autocpu.api",
    "load_plan": "autocpu.plans",
    "AutocpuWarning": "autocpu.errors",
    "Tolerance": "autocpu.accuracy",
    "AutocpuError": "autocpu.errors",
    "Plan": "autocpu.plans",
    "PlanCache": "autocpu.plans",
    "probe": "autocpu.hardware",
    "CpuInfo": "autocpu.hardware",
    "TunedModel": "autocpu.tuned",
    "tune_sentence_transformer": "autocpu.sentence_encoders",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'autocpu' has no attribute {name!r}")
