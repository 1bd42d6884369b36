"""What is measured and compared: the call a deployment makes, over the user's example inputs.

A workload says how to call a runner (the user's model or a built candidate) on the example
inputs, which outputs the accuracy gate compares, how the second-length check is made and which
small probe a plan keeps as its canary. The search, the finals, the worker processes and the
plan take a workload instead of knowing what a call is. One forward pass over every example
batch is the workload of every model today.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from autocpu.accuracy import AccuracyReport, Tolerance, compare_batches
from autocpu.errors import AutocpuError, one_line
from autocpu.inputs import Batch, at_sequence_length, second_length, signature

#: Rows of the first example batch kept as the canary's probe (shapes stay those tuned on).
PROBE_ROWS = 2


class Workload(ABC):
    """The unit every latency number refers to, and what its outputs are compared on."""

    #: Recorded in the plan: the workload its latencies and accuracy refer to.
    name: ClassVar[str]

    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches

    @abstractmethod
    def run(self, runner: Callable[..., Any]) -> list[Any]:
        """Call ``runner`` on the example inputs; the outputs the accuracy gate compares."""

    @abstractmethod
    def at_second_length(self) -> Workload | None:
        """The same workload at another sequence length (catches graphs that baked in the
        example's shape), or None when the inputs have no sequence axis."""

    @abstractmethod
    def probe(self) -> Workload:
        """A small slice of this workload, cheap enough to run on every cache hit."""

    def timed(self, runner: Callable[..., Any]) -> Callable[[], object]:
        """What the clock measures: one :meth:`run`."""
        return lambda: self.run(runner)

    def compare(
        self, references: list[Any], outputs: list[Any], tolerance: Tolerance
    ) -> AccuracyReport:
        """Worst case over the outputs, at real tokens only (padding is not compared)."""
        return compare_batches(references, outputs, tolerance, self.batches)

    def references(self, model: torch.nn.Module) -> list[Any]:
        """The fp32 eager outputs every candidate must match; also proves the inputs fit."""
        wrong = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
        if wrong:
            raise AutocpuError(
                f"the model's weights are {', '.join(wrong)}, not float32",
                "tune the fp32 model (model.float()): autocpu tries lower precisions itself",
            )
        try:
            with torch.inference_mode():
                return self.run(model)
        except Exception as error:
            raise AutocpuError(
                f"the model rejected example_inputs ({one_line(error)})",
                "pass the inputs you call the model with, "
                "e.g. tokenizer(texts, return_tensors='pt')",
            ) from error

    def signature(self) -> list[dict[str, Any]]:
        """Names, shapes and dtypes of the inputs: part of a plan's identity."""
        return signature(self.batches)


class ForwardPass(Workload):
    """One forward pass over every example batch, compared on every output tensor."""

    name: ClassVar[str] = "forward"

    def run(self, runner: Callable[..., Any]) -> list[Any]:
        return [runner(**batch) for batch in self.batches]

    def at_second_length(self) -> ForwardPass | None:
        lengths = [second_length(batch) for batch in self.batches]
        if any(length is None for length in lengths):
            return None
        pairs = zip(self.batches, lengths, strict=True)
        return ForwardPass([at_sequence_length(batch, length) for batch, length in pairs])

    def probe(self) -> ForwardPass:
        first = self.batches[0]
        rows = {k: v[:PROBE_ROWS].clone() for k, v in first.items() if isinstance(v, torch.Tensor)}
        return ForwardPass([rows])


WORKLOADS: dict[str, type[Workload]] = {ForwardPass.name: ForwardPass}
