"""The machine's physical limit: FLOPs a model call needs and the GEMM peak per precision.

A model call's FLOPs are counted (``torch.utils.flop_counter``) on the eager-attention variant,
whose attention is plain matmuls the counter sees (its SDPA kernel on CPU goes uncounted). The
peak is the best of a few large GEMMs at the process's thread count: MKL/oneDNN sgemm for fp32,
bf16 matmul (AVX512-BF16/AMX), and for int8 the better of ``torch._int_mm`` (oneDNN, fast with
VNNI) and FBGEMM's dynamic int8 linear (what eager's int8 runs; on CPUs without VNNI
``torch._int_mm`` falls back to a path ~100x slower, which is no limit worth quoting).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

GEMM_SHAPES = ((128, 768, 3072), (1024, 1024, 1024), (2048, 2048, 2048))
PRECISIONS = ("fp32", "bf16", "int8")


def flops_per_call(model: torch.nn.Module, batch: dict[str, Any]) -> float:
    """FLOPs of one forward pass over ``batch`` (multiply-adds count as two)."""
    from torch.utils.flop_counter import FlopCounterMode

    from autocpu.backends.eager import with_attention

    counted = with_attention(model, "eager")
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        counted(**batch)
    return float(counter.get_total_flops())


def _matmuls(m: int, k: int, n: int, precision: str) -> list[Callable[[], Any]]:
    """The ways torch multiplies (m, k) by (k, n) in ``precision``; the peak is the best."""
    if precision == "int8":
        a = torch.randint(-128, 127, (m, k), dtype=torch.int8)
        b = torch.randint(-128, 127, (k, n), dtype=torch.int8)
        linear = torch.ao.quantization.quantize_dynamic(
            torch.nn.Linear(k, n, bias=False), {torch.nn.Linear}, dtype=torch.qint8
        )
        x = torch.randn(m, k)
        return [lambda: torch._int_mm(a, b), lambda: linear(x)]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    return [lambda: torch.mm(a, b)]


def _rate(matmul: Callable[[], Any], flops: float, seconds: float) -> float:
    matmul()  # warm-up: packing, thread pool
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        matmul()
        calls += 1
    return flops * calls / (time.perf_counter() - started) / 1e9


def gemm_gflops(m: int, k: int, n: int, precision: str, seconds: float = 1.0) -> float:
    with torch.inference_mode():
        return max(_rate(f, 2.0 * m * k * n, seconds) for f in _matmuls(m, k, n, precision))


def fraction_of_peak(
    gflops: float, precision: str, peaks: dict[str, dict[str, Any]]
) -> float | None:
    """The share of the measured GEMM peak for ``precision`` (None where none was measured)."""
    peak = peaks.get(precision, {}).get("gflops")
    return gflops / peak if peak else None


def gemm_peaks(native_bf16: bool) -> dict[str, dict[str, Any]]:
    """Best GFLOP/s (GOP/s for int8) per precision over ``GEMM_SHAPES``, with each shape's."""
    peaks = {}
    for precision in PRECISIONS:
        if precision == "bf16" and not native_bf16:
            continue  # emulated bf16 is no limit worth quoting
        by_shape = {"x".join(map(str, s)): gemm_gflops(*s, precision) for s in GEMM_SHAPES}
        peaks[precision] = {"gflops": max(by_shape.values()), "by_shape": by_shape}
    return peaks
