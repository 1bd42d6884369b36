"""The accuracy gate: a candidate's outputs against the fp32 eager reference.

Four numbers per output tensor: max absolute difference, that difference relative to the
reference's scale (its max absolute value), cosine similarity, and, for logits, how often the
argmax agrees. A tolerance bounds the relative difference, cosine and argmax agreement
(optionally the absolute difference too); presets cover fp32-faithful, bf16-, int8- and (for
generation) int4-level.

Generation is compared teacher-forced, so one changed token does not make every later position
incomparable: the candidate's logits along the reference's own greedy continuation (the same
four numbers; the argmax agreement is the top-1 agreement per position), the perplexity of that
continuation under the candidate relative to fp32 eager's, plus the greedy tokens the candidate
generated itself (the fraction identical and the identical prefix).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from autocpu.errors import AutocpuError
from autocpu.outputs import named_tensors
from autocpu.records import AccuracyReport

__all__ = [
    "AccuracyReport",
    "Tolerance",
    "compare_batches",
    "compare_generated",
    "compare_outputs",
]


@dataclass(frozen=True)
class Tolerance:
    """How far a candidate's outputs may drift from the fp32 eager reference."""

    max_rel: float = 1e-4
    min_cosine: float = 0.99999
    min_argmax: float = 1.0
    max_abs: float | None = None
    name: str = "custom"
    #: Generation only: the fraction of greedy tokens that must equal fp32 eager's, position by
    #: position. None: all of them when ``min_argmax`` is 1, else not bounded (see
    #: :attr:`same_tokens_bound`).
    min_same_tokens: float | None = None
    #: Generation only: how many times fp32 eager's perplexity of its own greedy continuation
    #: the candidate's may be (teacher-forced; None: not bounded).
    max_perplexity_ratio: float | None = None

    def __post_init__(self) -> None:
        bad = []
        if not (math.isfinite(self.max_rel) and self.max_rel > 0):
            bad.append(f"max_rel={self.max_rel}")
        if not (-1.0 <= self.min_cosine <= 1.0):
            bad.append(f"min_cosine={self.min_cosine}")
        if not (0.0 <= self.min_argmax <= 1.0):
            bad.append(f"min_argmax={self.min_argmax}")
        if self.max_abs is not None and not (math.isfinite(self.max_abs) and self.max_abs > 0):
            bad.append(f"max_abs={self.max_abs}")
        if self.min_same_tokens is not None and not (0.0 <= self.min_same_tokens <= 1.0):
            bad.append(f"min_same_tokens={self.min_same_tokens}")
        ratio = self.max_perplexity_ratio
        if ratio is not None and not (math.isfinite(ratio) and ratio >= 1.0):
            bad.append(f"max_perplexity_ratio={ratio}")
        if bad:
            raise AutocpuError(
                f"bad tolerance: {', '.join(bad)}",
                "use max_rel > 0, min_cosine in [-1, 1], min_argmax in [0, 1], max_abs > 0, "
                "min_same_tokens in [0, 1], max_perplexity_ratio >= 1 "
                "(or a preset: 'strict', 'bf16', 'int8', 'int4')",
            )

    @classmethod
    def strict(cls) -> Tolerance:
        """fp32-faithful: only reordering of float math (measured ~1e-6 relative)."""
        return cls(max_rel=1e-4, min_cosine=0.99999, min_argmax=1.0, name="strict")

    @classmethod
    def bf16(cls) -> Tolerance:
        """bf16-level: bf16 weights or autocast (measured 0.5-2% relative on bert-base)."""
        return cls(max_rel=0.05, min_cosine=0.999, min_argmax=0.95, name="bf16")

    @classmethod
    def int8(cls) -> Tolerance:
        """int8-level: dynamic int8 quantization (measured ~4% relative, cosine 0.999); for
        generation the continuation's perplexity may also rise by :data:`INT8_PERPLEXITY`."""
        return cls(
            max_rel=0.15,
            min_cosine=0.99,
            min_argmax=0.9,
            name="int8",
            max_perplexity_ratio=INT8_PERPLEXITY,
        )

    @classmethod
    def int4(cls) -> Tolerance:
        """int4-level, for generation with 4-bit weights: the teacher-forced logits may differ
        widely in places (a bound on the relative difference would reject every 4-bit model),
        so what is bounded is what a reader of the text sees: top-1 agreement per position,
        the logits' cosine, and the continuation's perplexity (see :data:`INT4_PERPLEXITY`)."""
        return cls(
            max_rel=INT4_MAX_REL,
            min_cosine=INT4_MIN_COSINE,
            min_argmax=INT4_MIN_TOP1,
            name="int4",
            max_perplexity_ratio=INT4_PERPLEXITY,
        )

    def for_workload(self, workload: str) -> Tolerance:
        """This tolerance without the bounds ``workload`` has nothing to apply them to (a
        forward pass generates no tokens): a plan's key then stays that of the forward bounds."""
        if workload == "generate":
            return self
        return replace(self, **dict.fromkeys(_GENERATION_ONLY))

    @classmethod
    def parse(cls, value: Any) -> Tolerance:
        """Accept a Tolerance, a preset name, a dict of fields, or a number (``max_rel``)."""
        if isinstance(value, Tolerance):
            return value
        if value is None:
            return cls.strict()
        if isinstance(value, str):
            presets = {
                "strict": cls.strict,
                "fp32": cls.strict,
                "bf16": cls.bf16,
                "int8": cls.int8,
                "int4": cls.int4,
            }
            if value.lower() in presets:
                return presets[value.lower()]()
            try:
                return cls(max_rel=float(value), min_cosine=-1.0, min_argmax=0.0)
            except ValueError:
                pass
        if isinstance(value, dict):
            try:
                return cls(**value)
            except TypeError as error:
                raise AutocpuError(f"bad tolerance fields: {error}", _TOLERANCE_FIX) from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return cls(max_rel=float(value), min_cosine=-1.0, min_argmax=0.0)
        raise AutocpuError(f"bad tolerance {value!r}", _TOLERANCE_FIX)

    def to_dict(self) -> dict[str, Any]:
        """The fields, the generation-only ones only when set (so plan keys made before they
        existed, shipped plans included, stay the same)."""
        data = asdict(self)
        for name in _GENERATION_ONLY:
            if data[name] is None:
                del data[name]
        return data

    @property
    def same_tokens_bound(self) -> float:
        """The fraction of greedy tokens that must be fp32 eager's.

        Top-1 agreement of 1 at every teacher-forced position implies identical greedy tokens
        (each next token is the argmax after an identical prefix), so a tolerance that demands
        it demands identical tokens too, and a candidate whose cached decode path differs from
        its full forward is caught. A tolerance that admits a changed top-1 admits a changed
        token, after which greedy decoding follows another continuation: the tokens are then
        reported, and the teacher-forced logits are the bound.
        """
        if self.min_same_tokens is not None:
            return self.min_same_tokens
        return 1.0 if self.min_argmax >= 1.0 else 0.0

    @property
    def admits_lossy(self) -> bool:
        """Whether bf16 or int8 candidates can pass: they differ by 0.5-4% relative (measured
        on bert-base), so a bound below 0.1% or a cosine above 0.99999 rules them out."""
        return self.max_rel >= LOSSY_MIN_REL and self.min_cosine < 0.99999

    @property
    def admits_int4(self) -> bool:
        """Whether 4-bit weights can pass: only as loose as the ``int4`` preset in relative
        difference, cosine and top-1 agreement (tighter bounds reject every 4-bit candidate,
        and each costs a compression to find that out)."""
        return (
            self.max_rel >= INT4_MAX_REL
            and self.min_cosine <= INT4_MIN_COSINE
            and self.min_argmax <= INT4_MIN_TOP1
        )


#: The smallest relative difference a bf16 or int8 candidate was seen to stay within.
LOSSY_MIN_REL = 1e-3
#: int8 weights changed the perplexity of fp32's greedy continuation by 0.994-1.032x on the
#: trained SmolLM2-135M (OpenVINO per channel, ONNX Runtime ``MatMulNBits`` in blocks of 128):
#: a 5% rise is int8-level, more is a damaged model.
INT8_PERPLEXITY = 1.05
#: Perplexity is exp of the mean per-token surprise, so a 10% rise makes each token of the text
#: ~0.095 nats less likely on average: about three times what int8 weights cost (<= 0.032), the
#: loss allowed for halving the bytes again. On SmolLM2-135M most 4-bit settings measured
#: 1.12-1.87x (nncf and ``MatMulNBits``, groups of 32-128, with and without AWQ) and are
#: rejected; nncf groups of 32 with AWQ (1.095x) and groups of 64 (1.023x) stayed within.
INT4_PERPLEXITY = 1.10
#: Single 4-bit logits moved by 0.37-0.60 of the largest there, so the relative difference is not
#: what bounds a 4-bit model; the ranking greedy decoding reads and the logits' direction are
#: (int8 weights kept top-1 >= 0.947 and cosine >= 0.998; 4-bit ones 0.59-0.72 and 0.87-0.96).
INT4_MAX_REL = 1.0
INT4_MIN_COSINE = 0.95
INT4_MIN_TOP1 = 0.8
_GENERATION_ONLY = ("min_same_tokens", "max_perplexity_ratio")

_TOLERANCE_FIX = (
    "use 'strict', 'bf16', 'int8', 'int4', a relative difference such as 0.01, "
    "or Tolerance(max_rel=..., min_cosine=..., min_argmax=...)"
)


def _tensor_numbers(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float, float]:
    ref64, got64 = ref.detach().double().flatten(), got.detach().double().flatten()
    diff = (ref64 - got64).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    scale = float(ref64.abs().max()) if ref64.numel() else 0.0
    rel = max_abs / scale if scale > 0 else max_abs
    denom = float(ref64.norm() * got64.norm())
    cosine = float(ref64 @ got64) / denom if denom > 0 else (1.0 if max_abs == 0 else 0.0)
    return max_abs, rel, cosine


def real_tokens(tensor: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-token outputs at real tokens only: values at padding are undefined, and engines
    legitimately differ there (OpenVINO's GPT-2 logits at padded positions differ by ~0.4)."""
    if mask is None or tensor.dim() < 2 or tuple(tensor.shape[:2]) != tuple(mask.shape):
        return tensor
    return tensor[mask.bool()]


def compare_outputs(
    reference: Any, candidate: Any, tolerance: Tolerance, mask: torch.Tensor | None = None
) -> AccuracyReport:
    """Compare every tensor the reference returns (caches excepted) with the candidate's.

    ``mask`` (the batch's attention_mask) restricts per-token outputs to real tokens.
    """
    ref_tensors = named_tensors(reference)
    got_tensors = named_tensors(candidate)
    report = AccuracyReport()
    for name, ref in ref_tensors.items():
        got = got_tensors.get(name)
        if got is None:
            report.failures.append(f"output {name!r} missing")
            report.missing.append(name)
            continue
        if tuple(got.shape) != tuple(ref.shape):
            report.failures.append(f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}")
            continue
        ref, got = real_tokens(ref, mask), real_tokens(got, mask)
        if not torch.isfinite(got.float()).all() and torch.isfinite(ref.float()).all():
            report.failures.append(f"{name}: non-finite values")
            continue
        max_abs, rel, cosine = _tensor_numbers(ref, got)
        report.max_abs = max(report.max_abs, max_abs)
        report.max_rel = max(report.max_rel, rel)
        report.min_cosine = min(report.min_cosine, cosine)
        if rel > tolerance.max_rel:
            report.failures.append(f"{name}: relative diff {rel:.2e} > {tolerance.max_rel:g}")
        if tolerance.max_abs is not None and max_abs > tolerance.max_abs:
            report.failures.append(f"{name}: abs diff {max_abs:.2e} > {tolerance.max_abs:g}")
        if cosine < tolerance.min_cosine:
            report.failures.append(f"{name}: cosine {cosine:.6f} < {tolerance.min_cosine}")
        if name.endswith("logits") and ref.dim() >= 1 and ref.shape[-1] > 1:
            agree = float((ref.argmax(-1) == got.argmax(-1)).double().mean())
            report.min_argmax = min(
                report.min_argmax if report.min_argmax is not None else 1.0, agree
            )
            if agree < tolerance.min_argmax:
                report.failures.append(
                    f"{name}: argmax agreement {agree:.3f} < {tolerance.min_argmax}"
                )
    return report


def compare_batches(
    references: list[Any],
    candidates: list[Any],
    tolerance: Tolerance,
    batches: list[dict[str, Any]] | None = None,
) -> AccuracyReport:
    """Worst case over several batches (masked by each batch's attention_mask if given)."""
    total = AccuracyReport()
    masks = [b.get("attention_mask") for b in batches] if batches else [None] * len(references)
    for reference, candidate, mask in zip(references, candidates, masks, strict=True):
        total.merge(compare_outputs(reference, candidate, tolerance, mask))
    return total


def compare_generated(
    reference: Mapping[str, torch.Tensor],
    candidate: Mapping[str, torch.Tensor],
    tolerance: Tolerance,
    prompt_length: int,
    mask: torch.Tensor | None = None,
) -> AccuracyReport:
    """One batch of generation: the teacher-forced ``logits`` (over the prompt and the
    reference continuation, masked by the full sequence's ``mask``) and the new greedy
    ``sequences`` tokens after ``prompt_length``, each against fp32 eager's."""
    report = compare_outputs(
        {"logits": reference["logits"]}, {"logits": candidate["logits"]}, tolerance, mask
    )
    expected, got = reference["sequences"], candidate["sequences"]
    if tuple(candidate["logits"].shape) == tuple(reference["logits"].shape):
        ratio = perplexity_ratio(reference["logits"], candidate["logits"], expected, prompt_length)
        report.perplexity_ratio = ratio
        bound = tolerance.max_perplexity_ratio
        if bound is not None and ratio > bound:
            report.failures.append(
                f"perplexity of fp32's continuation {ratio:.3f}x fp32 eager's > {bound:g}x"
            )
    if tuple(got.shape) != tuple(expected.shape):
        report.failures.append(f"generated {tuple(got.shape)} tokens, not {tuple(expected.shape)}")
        return report
    same = expected[:, prompt_length:] == got[:, prompt_length:]
    report.same_tokens = float(same.double().mean()) if same.numel() else 1.0
    report.same_prefix = int(same.int().cumprod(dim=1).sum(dim=1).min()) if same.numel() else 0
    bound = tolerance.same_tokens_bound
    if report.same_tokens < bound:
        report.failures.append(
            f"greedy tokens: {report.same_tokens:.0%} identical to fp32's (first "
            f"{report.same_prefix} in every row) < {bound:.0%}"
        )
    return report


def perplexity_ratio(
    reference_logits: torch.Tensor,
    candidate_logits: torch.Tensor,
    sequences: torch.Tensor,
    prompt_length: int,
) -> float:
    """The candidate's perplexity of the continuation in ``sequences`` (the tokens after
    ``prompt_length``, teacher-forced) over the reference's: exp of the mean difference in
    negative log-likelihood, every continuation token of every row counted once. 1.0: as
    likely under both; 1.1: the candidate finds the text 10% more surprising."""
    if sequences.shape[-1] <= prompt_length:
        return 1.0
    targets = sequences[:, prompt_length:]
    predicting = slice(prompt_length - 1, sequences.shape[-1] - 1)

    def mean_nll(logits: torch.Tensor) -> float:
        scores = logits[:, predicting].double().log_softmax(-1)
        return float(-scores.gather(-1, targets.unsqueeze(-1)).mean())

    return math.exp(mean_nll(candidate_logits) - mean_nll(reference_logits))
