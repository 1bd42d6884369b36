"""What a user gets by following each stack's usual guide by hand, one column each.

Every column is built the way the guides show it, with no tuning: the point is to show what
autocpu adds over the obvious choices. A column that fails to build (TorchScript on GPT-2, say)
is reported with its error, not left out.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autocpu.errors import one_line
from autocpu.models import load_model_dir

Call = Callable[..., Any]


@dataclass
class Column:
    """A runnable column, its one-time costs and the precision its math runs in."""

    name: str
    label: str
    run: Call | None
    precision: str = "fp32"
    setup_s: float = 0.0
    first_call_s: float = 0.0
    error: str = ""


def _eager(model_dir: Path, task: str, batch: dict) -> tuple[Call, str]:
    return load_model_dir(model_dir, task), "fp32"


def _eager_attention(model_dir: Path, task: str, batch: dict) -> tuple[Call, str]:
    model = load_model_dir(model_dir, task)
    return type(model).from_pretrained(model_dir, attn_implementation="eager").eval(), "fp32"


def _torchscript(model_dir: Path, task: str, batch: dict) -> tuple[Call, str]:
    """transformers' TorchScript guide: ``torchscript=True``, trace with positional tensors.

    (Tracing with keyword inputs and freezing breaks on the second call in torch 2.13.)
    """
    model = type(load_model_dir(model_dir, task)).from_pretrained(model_dir, torchscript=True)
    parameters = list(inspect.signature(model.forward).parameters)
    names = parameters[: len(batch)]
    if set(names) != set(batch):
        raise RuntimeError(f"inputs {sorted(batch)} are not forward's first parameters {names}")
    with torch.no_grad():
        traced = torch.jit.trace(model.eval(), tuple(batch[n] for n in names), strict=False)
        frozen = torch.jit.freeze(traced)
    return (lambda **inputs: frozen(*(inputs[n] for n in names))), "fp32"


def _torch_compile(model_dir: Path, task: str, batch: dict) -> tuple[Call, str]:
    return torch.compile(load_model_dir(model_dir, task)), "fp32"


def _optimum(module: str, prefix: str, task: str) -> type:
    from autocpu.backends._optimum_common import model_class

    cls = model_class(module, prefix, task)
    if cls is None:
        raise RuntimeError(f"{module} has no {prefix} class for {task}")
    return cls


def _ort(model_dir: Path, task: str, batch: dict) -> tuple[Call, str]:
    cls = _optimum("optimum.onnxruntime", "ORTModelFor", task)
    return cls.from_pretrained(model_dir, export=True), "fp32"


#: Runs in a child process: OpenVINO's PyTorch frontend leaves the exporting process's
#: TorchScript runtime broken (a frozen trace called after an export segfaulted here).
_OV_EXPORT = (
    "import sys, optimum.intel as oi; "
    "getattr(oi, sys.argv[1]).from_pretrained(sys.argv[2], export=True).save_pretrained(sys.argv[3])"
)


def _openvino(config: dict[str, str] | None) -> Callable[[Path, str, dict], tuple[Call, str]]:
    """optimum-intel's usual two steps: export the IR, then ``from_pretrained`` it."""

    def build(model_dir: Path, task: str, batch: dict) -> tuple[Call, str]:
        from autocpu.backends.openvino import compiled_precision

        cls = _optimum("optimum.intel", "OVModelFor", task)
        exported = Path(tempfile.mkdtemp(prefix="ov-by-hand-"))
        command = [sys.executable, "-c", _OV_EXPORT, cls.__name__, str(model_dir), str(exported)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"OpenVINO export failed: {done.stderr.strip()[-300:]}")
        model = cls.from_pretrained(exported, ov_config=config)
        precision = compiled_precision(model)
        return model, {"f32": "fp32", "bf16": "bf16"}.get(precision, precision)

    return build


#: name -> (label in tables, builder). The first is the baseline every ratio refers to.
BY_HAND: dict[str, tuple[str, Callable[[Path, str, dict], tuple[Call, str]]]] = {
    "eager": ("fp32 eager (transformers' default: SDPA)", _eager),
    "eager_attention": ('attn_implementation="eager"', _eager_attention),
    "torchscript": ("TorchScript trace + freeze", _torchscript),
    "torch_compile": ("torch.compile default", _torch_compile),
    "ort": ("ORTModelFor... defaults", _ort),
    "openvino": ("OVModelFor... defaults", _openvino(None)),
    "openvino_f32": ("OVModelFor... f32 forced", _openvino({"INFERENCE_PRECISION_HINT": "f32"})),
}


def build_column(name: str, model_dir: Path, task: str, batch: dict) -> Column:
    """Build one by-hand column, timing its setup and first call; a failure is recorded."""
    label, builder = BY_HAND[name]
    started = time.perf_counter()
    try:
        model, precision = builder(model_dir, task, batch)
        setup_s = time.perf_counter() - started
        started = time.perf_counter()
        with torch.inference_mode():
            model(**batch)
        return Column(name, label, model, precision, setup_s, time.perf_counter() - started)
    except Exception as error:  # a guide's recipe that fails here is a result, not a crash
        return Column(name, label, None, error=one_line(error))
