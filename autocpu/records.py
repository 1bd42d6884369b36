"""Typed records of a tune, shared by the search, the finals, plans and both reports.

They sit low in the house (no torch, no Optuna) so every layer above can import them. Each
serialises to the JSON a plan file holds and reads it back.
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from typing import Any

from autocpu.measure import LatencyStats

#: Trial outcomes: measured, failed the accuracy gate, crashed, or could not run here at all.
OK, INACCURATE, FAILED, INELIGIBLE, PENDING = "ok", "inaccurate", "failed", "ineligible", "pending"
#: The ``reason`` that marks the baseline among a plan's trials.
BASELINE = "baseline"


@dataclass
class AccuracyReport:
    """Worst-case numbers over every output tensor and batch, and what failed."""

    max_abs: float = 0.0
    max_rel: float = 0.0
    min_cosine: float = 1.0
    min_argmax: float | None = None
    #: Generation: the fraction of greedy tokens identical to fp32 eager's, and the shortest
    #: identical prefix over the rows (None for other workloads).
    same_tokens: float | None = None
    same_prefix: int | None = None
    #: Generation: the candidate's perplexity of fp32 eager's greedy continuation over fp32
    #: eager's own, the highest over the batches (None for other workloads).
    perplexity_ratio: float | None = None
    failures: list[str] = field(default_factory=list)
    #: Outputs the reference returns and the candidate did not (its numbers cover the rest).
    missing: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def measured(self) -> AccuracyReport | None:
        """This report when its numbers cover every output, None when outputs were missing
        (numbers over what was returned would read as a perfect match)."""
        return None if self.missing else self

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AccuracyReport:
        return cls(**checked_fields(cls, data))

    def merge(self, other: AccuracyReport) -> None:
        self.max_abs = max(self.max_abs, other.max_abs)
        self.max_rel = max(self.max_rel, other.max_rel)
        self.min_cosine = min(self.min_cosine, other.min_cosine)
        self.min_argmax = _lowest(self.min_argmax, other.min_argmax)
        self.same_tokens = _lowest(self.same_tokens, other.same_tokens)
        self.same_prefix = _lowest(self.same_prefix, other.same_prefix)
        if other.perplexity_ratio is not None:
            self.perplexity_ratio = max(self.perplexity_ratio or 0.0, other.perplexity_ratio)
        self.failures.extend(other.failures)
        self.missing.extend(name for name in other.missing if name not in self.missing)


def _lowest(mine: Any, theirs: Any) -> Any:
    """The lower of two optional numbers (None: not measured)."""
    if theirs is None:
        return mine
    return theirs if mine is None else min(mine, theirs)


@dataclass(frozen=True)
class GenerationStats:
    """What someone generating text waits for, from ``generate()`` calls over the example
    prompts with ``new_tokens`` new tokens each.

    ``ttft_ms``: until the first new token (the prefill). ``tpot_ms``: each further decode step,
    the rest of the call over ``new_tokens - 1``. ``tokens_per_s``: decode tokens per second over
    every prompt row, the decode steps only.
    """

    new_tokens: int
    ttft_ms: float
    tpot_ms: float
    tokens_per_s: float

    @classmethod
    def from_times(
        cls, new_tokens: int, rows: int, first_token_s: float, decode_s: float
    ) -> GenerationStats:
        steps = max(new_tokens - 1, 1)
        decode_s = max(decode_s, 1e-9)
        return cls(
            new_tokens=new_tokens,
            ttft_ms=first_token_s * 1000.0,
            tpot_ms=decode_s * 1000.0 / steps,
            tokens_per_s=rows * steps / decode_s,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerationStats:
        return cls(**checked_fields(cls, data))


@dataclass
class TrialRecord:
    """One candidate's outcome, as ``explain()`` and the HTML report show it."""

    backend: str
    params: dict[str, Any]
    status: str = PENDING
    number: int | None = None
    latency: LatencyStats | None = None
    accuracy: AccuracyReport | None = None
    build_s: float | None = None
    first_call_s: float | None = None
    reason: str = ""
    #: Measured interleaved against the baseline in the finals; None for the others.
    speedup: float | None = None
    worker: str = ""
    #: Generation workloads: TTFT, TPOT and tokens/s of this candidate.
    generation: GenerationStats | None = None

    @property
    def median_ms(self) -> float:
        return self.latency.median_ms if self.latency else float("inf")

    @property
    def identity(self) -> tuple:
        """What makes two trials the same candidate: the backend and its settings."""
        return (self.backend, tuple(sorted(self.params.items())))

    @property
    def is_baseline(self) -> bool:
        return self.reason == BASELINE

    @property
    def one_time_s(self) -> float | None:
        """Build plus first call, paid once per process; None when it never built."""
        if self.build_s is None:
            return None
        return self.build_s + (self.first_call_s or 0.0)

    def fail(self, status: str, reason: str) -> TrialRecord:
        self.status, self.reason = status, reason
        return self

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["accuracy"] = self.accuracy.to_dict() if self.accuracy else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrialRecord:
        values = checked_fields(cls, data)
        if values.get("latency") is not None:
            values["latency"] = LatencyStats(**checked_fields(LatencyStats, values["latency"]))
        if values.get("accuracy") is not None:
            values["accuracy"] = AccuracyReport.from_dict(values["accuracy"])
        if values.get("generation") is not None:
            values["generation"] = GenerationStats.from_dict(values["generation"])
        return cls(**values)


def checked_fields(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``data`` that are fields of the dataclass ``cls``: every required field
    present, each of the JSON type its annotation implies (a ValueError names the first that
    is not). Unknown entries are left out, so files of newer versions still read."""
    if not isinstance(data, Mapping):
        raise ValueError(f"a {cls.__name__} is a JSON {type(data).__name__}, not an object")
    hints = field_types(cls)
    values = {k: v for k, v in data.items() if k in hints}
    missing = [
        f.name
        for f in fields(cls)
        if f.name not in values and f.default is MISSING and f.default_factory is MISSING
    ]
    if missing:
        raise ValueError(f"{cls.__name__} lacks {missing}")
    for name, value in values.items():
        if not json_type_fits(value, hints[name]):
            raise ValueError(f"{cls.__name__}.{name} is {value!r:.40}, not {hints[name]}")
    return values


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass's fields (read once per class: a study read
    checks every record of every trial)."""
    return typing.get_type_hints(cls)


def json_type_fits(value: Any, hint: Any) -> bool:
    """Whether a value read from JSON can be a field annotated ``hint``: the container kind for
    generics, an object for nested records, a finite or infinite number (never a bool) for
    ``float`` and ``int``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(json_type_fits(value, arg) for arg in typing.get_args(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin is not None:
        return isinstance(value, origin)
    if is_dataclass(hint):
        return isinstance(value, Mapping)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)
