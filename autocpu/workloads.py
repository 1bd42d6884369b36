"""What is measured and compared: the call a deployment makes, over the user's example inputs.

A workload says how to call a runner (the user's model or a built candidate) on the example
inputs, which outputs the accuracy gate compares, how the second-length check is made and which
small probe a plan keeps as its canary. The search, the finals, the worker processes and the
plan take a workload instead of knowing what a call is.

Two workloads: one forward pass over every example batch (:class:`ForwardPass`), and greedy
``generate()`` of a fixed number of new tokens from every example prompt (:class:`Generation`),
what serving a causal LM waits for: there the decode loop, one token at a time over the KV
cache, dominates, and engines differ far more than on one forward pass over the prompt.
"""

from __future__ import annotations

import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from autocpu.accuracy import AccuracyReport, Tolerance, compare_batches, compare_generated
from autocpu.errors import AutocpuError, one_line
from autocpu.inputs import Batch, at_sequence_length, second_length, sequence_length, signature
from autocpu.options import DEFAULT_MAX_NEW_TOKENS, WORKLOAD_NAMES
from autocpu.records import GenerationStats

#: Rows of the first example batch kept as the canary's probe (shapes stay those tuned on).
PROBE_ROWS = 2
#: New tokens the canary of a generation plan generates (enough to run the cached decode path).
PROBE_NEW_TOKENS = 4


class Workload(ABC):
    """The unit every latency number refers to, and what its outputs are compared on."""

    #: Recorded in the plan: the workload its latencies and accuracy refer to.
    name: ClassVar[str]
    #: Untimed calls before each timed one when runtimes take turns (see measure.interleaved).
    settle_calls: ClassVar[int] = 1

    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches

    def settings(self) -> dict[str, Any]:
        """What besides the inputs decides the measurement (part of the plan key when set)."""
        return {}

    @classmethod
    def restore(cls, batches: list[Batch], settings: dict[str, Any]) -> Workload:
        """The workload :meth:`settings` describes, on ``batches`` (canaries, plans)."""
        return cls(batches, **settings)

    def use_references(self, references: list[Any]) -> None:
        """Take ``references`` (fp32 eager outputs made elsewhere: a canary's) as the outputs
        :meth:`run` and :meth:`compare` work against (a forward pass needs nothing of them)."""
        return None

    def generation_stats(self, runner: Callable[..., Any]) -> Any:
        """TTFT, TPOT and tokens/s of ``runner`` (None for workloads that generate nothing)."""
        return None

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
        return ForwardPass([_first_rows(self.batches[0])])


def _first_rows(batch: Batch) -> Batch:
    return {k: v[:PROBE_ROWS].clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}


class _FirstTokenClock:
    """A streamer that notes when generate() hands over its first new token (the prompt comes
    first, then one call per step), so TTFT comes from the same call that is timed whole."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.puts = 0
        self.first_token_s: float | None = None

    def put(self, value: Any) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_token_s = time.perf_counter() - self.started

    def end(self) -> None:
        pass


#: An encoder-decoder's forward inputs that generate() makes itself.
_DECODER_INPUTS = frozenset({"decoder_input_ids", "decoder_attention_mask"})


class Generation(Workload):
    """Greedy ``generate()`` of ``max_new_tokens`` tokens (EOS ignored) from every prompt batch.

    The clock times :meth:`timed`: one ``generate()`` per batch, the KV cache on. :meth:`run`
    also makes the teacher-forced forward the accuracy gate compares: the runner's logits along
    the fp32 eager greedy sequences (``targets``, set by :meth:`references`), so that one token
    that differs does not leave every later position without a comparable logit.
    """

    name: ClassVar[str] = "generate"
    #: A call runs for seconds, hundreds of decode steps: what the previous runtime's spinning
    #: threads cost its first milliseconds is noise there, and a settle call would double the
    #: finals' time.
    settle_calls: ClassVar[int] = 0

    def __init__(
        self,
        batches: list[Batch],
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        targets: list[torch.Tensor] | None = None,
    ) -> None:
        # generate() makes the decoder's inputs of an encoder-decoder itself: inputs made for
        # its forward pass (teacher-forced decoder ids) are not part of a prompt.
        super().__init__(
            [{k: v for k, v in b.items() if k not in _DECODER_INPUTS} for b in batches]
        )
        self.max_new_tokens = max_new_tokens
        #: The fp32 eager greedy sequences, prompt included, one tensor per batch.
        self.targets = targets

    def settings(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens}

    def generate(self, runner: Any, batch: Batch, **extra: Any) -> torch.Tensor:
        """One greedy ``generate()`` of exactly ``max_new_tokens`` new tokens.

        EOS is switched off (``eos_token_id=None``) rather than forbidden (``min_new_tokens``):
        forbidding it adds logits processors that scan the whole vocabulary on every step
        (~1 ms a token on a 49k vocabulary, a sixth of a 4-bit llama.cpp step), a cost no
        deployment's greedy loop pays, while a stop check on the last token costs microseconds.
        """
        config = getattr(runner, "generation_config", None)
        pad = getattr(config, "pad_token_id", None)
        if pad is None:
            eos = getattr(config, "eos_token_id", None)
            pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
        return runner.generate(
            **batch,
            max_new_tokens=self.max_new_tokens,
            eos_token_id=None,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            pad_token_id=pad,
            **extra,
        )

    def timed(self, runner: Callable[..., Any]) -> Callable[[], object]:
        return lambda: [self.generate(runner, batch) for batch in self.batches]

    @torch.inference_mode()
    def run(self, runner: Callable[..., Any]) -> list[Any]:
        """Per batch: the greedy ``sequences``, the teacher-forced ``logits`` and the
        ``prompt_length`` the sequences start with (1 for an encoder-decoder: its sequences
        are the decoder's, from its start token)."""
        outputs = []
        seq2seq = _is_encoder_decoder(runner)
        for index, batch in enumerate(self.batches):
            sequences = self.generate(runner, batch)
            forced = self.targets[index] if self.targets is not None else sequences
            scored = {**batch, "decoder_input_ids": forced} if seq2seq else None
            logits = runner(**(scored or _teacher_forced(batch, forced))).logits
            prompt = 1 if seq2seq else sequence_length(batch) or 0
            # A tensor, like the rest: canaries and worker pipes keep only tensors.
            prompt_length = torch.tensor(prompt)
            outputs.append(
                {"sequences": sequences, "logits": logits, "prompt_length": prompt_length}
            )
        return outputs

    def compare(
        self, references: list[Any], outputs: list[Any], tolerance: Tolerance
    ) -> AccuracyReport:
        total = AccuracyReport()
        for batch, reference, output in zip(self.batches, references, outputs, strict=True):
            prompt = int(reference.get("prompt_length", sequence_length(batch) or 0))
            # A decoder-only row is its prompt (maybe padded) and its continuation; an
            # encoder-decoder's decoder sequence has no padding.
            seq2seq = prompt != (sequence_length(batch) or 0)
            mask = None if seq2seq else _full_mask(batch, reference["sequences"])
            total.merge(compare_generated(reference, output, tolerance, prompt, mask))
        return total

    def references(self, model: torch.nn.Module) -> list[Any]:
        self._check_fits(model)
        references = super().references(model)
        self.use_references(references)
        return references

    def use_references(self, references: list[Any]) -> None:
        self.targets = [reference["sequences"] for reference in references]

    def _check_fits(self, model: torch.nn.Module) -> None:
        """One line for a model that cannot generate, or prompts its context cannot hold."""
        require_generate(model, "cannot be tuned for generation")
        config = getattr(model, "config", None)
        context = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
        prompt = max(sequence_length(batch) or 0 for batch in self.batches)
        if getattr(config, "is_encoder_decoder", False):  # the decoder holds the new tokens
            prompt = min(prompt, 1)
        if context and prompt + self.max_new_tokens > context:
            raise AutocpuError(
                f"prompts of {prompt} tokens plus max_new_tokens={self.max_new_tokens} exceed "
                f"the model's context of {context} tokens",
                "pass shorter prompts or a smaller max_new_tokens",
            )

    def at_second_length(self) -> Generation | None:
        lengths = [second_length(batch) for batch in self.batches]
        if any(length is None for length in lengths):
            return None
        pairs = zip(self.batches, lengths, strict=True)
        return Generation([at_sequence_length(b, n) for b, n in pairs], self.max_new_tokens)

    def probe(self) -> Generation:
        new_tokens = min(self.max_new_tokens, PROBE_NEW_TOKENS)
        return Generation([_first_rows(self.batches[0])], new_tokens)

    def generation_stats(self, runner: Callable[..., Any]) -> GenerationStats:
        """TTFT and decode speed from three generate() calls per batch, each timed whole and
        at its first token (a streamer notes it), so both come from the same calls."""
        first_token_s, decode_s = [], []
        for _ in range(3):
            first, total = 0.0, 0.0
            for batch in self.batches:
                clock = _FirstTokenClock()
                self.generate(runner, batch, streamer=clock)
                first += clock.first_token_s or 0.0
                total += time.perf_counter() - clock.started
            first_token_s.append(first)
            decode_s.append(total - first)
        rows = sum(int(batch["input_ids"].shape[0]) for batch in self.batches)
        return GenerationStats.from_times(
            self.max_new_tokens, rows, statistics.median(first_token_s), statistics.median(decode_s)
        )


def require_generate(model: Any, consequence: str) -> None:
    """Raise one line when ``model`` has no ``generate()`` (transformers' ``can_generate``)."""
    can_generate = getattr(model, "can_generate", None)
    if not callable(can_generate) or not can_generate():
        raise AutocpuError(
            f"{type(model).__name__} has no generate(), so it {consequence}",
            "pass a causal LM or an encoder-decoder (AutoModelForSeq2SeqLM), or workload='forward'",
        )


def _is_encoder_decoder(runner: Any) -> bool:
    return bool(getattr(getattr(runner, "config", None), "is_encoder_decoder", False))


def _teacher_forced(batch: Batch, sequences: torch.Tensor) -> Batch:
    """The forward inputs that score ``sequences`` (prompt and continuation) in one pass.

    Left-padded rows get the positions generate() gave them (counted from their first real
    token): engines derive positions from the mask differently when none are given.
    """
    mask = _full_mask(batch, sequences)
    inputs = {"input_ids": sequences, "attention_mask": mask}
    if not bool(mask.all()):
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return inputs


def _full_mask(batch: Batch, sequences: torch.Tensor) -> torch.Tensor:
    """The prompt's attention mask extended over the generated tokens."""
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.ones_like(sequences)
    extra = sequences.shape[-1] - mask.shape[-1]
    return torch.cat([mask, mask.new_ones(mask.shape[0], extra)], dim=-1)


WORKLOADS: dict[str, type[Workload]] = {ForwardPass.name: ForwardPass, Generation.name: Generation}
assert tuple(WORKLOADS) == WORKLOAD_NAMES  # the options name them without importing torch
