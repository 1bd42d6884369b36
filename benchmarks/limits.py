"""The machine's physical limit: FLOPs a model call needs and the GEMM peak per precision.

A model call's FLOPs are counted (``torch.utils.flop_counter``) on the eager-attention variant,
whose attention is plain matmuls the counter sees (its SDPA kernel on CPU goes uncounted). The
peak is the best of a few large GEMMs at the process's thread count: MKL/oneDNN sgemm for fp32,
bf16 matmul (AVX512-BF16/AMX) and ``torch._int_mm`` (VNNI) for int8.
"""

from __future__ import annotations

import time
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


def _operands(m: int, k: int, n: int, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    if precision == "int8":
        return (
            torch.randint(-128, 127, (m, k), dtype=torch.int8),
            torch.randint(-128, 127, (k, n), dtype=torch.int8),
        )
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)


def gemm_gflops(m: int, k: int, n: int, precision: str, seconds: float = 1.0) -> float:
    a, b = _operands(m, k, n, precision)
    matmul = torch._int_mm if precision == "int8" else torch.mm
    matmul(a, b)  # warm-up: packing, thread pool
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        matmul(a, b)
        calls += 1
    return 2.0 * m * k * n * calls / (time.perf_counter() - started) / 1e9


def gemm_peaks(native_bf16: bool) -> dict[str, dict[str, Any]]:
    """Best GFLOP/s (GOP/s for int8) per precision over ``GEMM_SHAPES``, with each shape's."""
    peaks = {}
    for precision in PRECISIONS:
        if precision == "bf16" and not native_bf16:
            continue  # emulated bf16 is no limit worth quoting
        by_shape = {"x".join(map(str, s)): gemm_gflops(*s, precision) for s in GEMM_SHAPES}
        peaks[precision] = {"gflops": max(by_shape.values()), "by_shape": by_shape}
    return peaks
