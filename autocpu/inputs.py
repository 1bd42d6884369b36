"""Example inputs: validation, signatures, a second sequence length, and synthesis for the CLI."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from autocpu.errors import AutocpuError
from autocpu.options import DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN

Batch = dict[str, Any]

_FILLER = (
    "autocpu measures every backend on the inputs you give it and keeps the fastest one that "
    "matches the reference outputs within your tolerance. "
)


def normalize_inputs(example_inputs: Any) -> list[Batch]:
    """Accept one batch (dict or BatchEncoding) or a list of batches; return a list of dicts."""
    if isinstance(example_inputs, Mapping):
        batches = [example_inputs]
    elif isinstance(example_inputs, Sequence) and not isinstance(example_inputs, (str, bytes)):
        batches = list(example_inputs)
    else:
        raise AutocpuError(
            f"example_inputs must be a dict of tensors or a list of them, "
            f"got {type(example_inputs).__name__}",
            "pass tokenizer(texts, return_tensors='pt') or a list of such batches",
        )
    if not batches:
        raise AutocpuError("example_inputs is empty", "pass at least one batch of inputs")
    normalized = []
    for index, batch in enumerate(batches):
        if not isinstance(batch, Mapping):
            raise AutocpuError(
                f"batch {index} of example_inputs is a {type(batch).__name__}, not a dict",
                "pass tokenizer(texts, return_tensors='pt') or a dict of tensors",
            )
        tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        if not tensors:
            raise AutocpuError(
                f"batch {index} of example_inputs holds no tensors",
                "tokenize with return_tensors='pt'",
            )
        normalized.append(dict(batch))
    return normalized


def signature(batches: list[Batch]) -> list[dict[str, Any]]:
    """Names, shapes and dtypes of every input: part of a plan's identity."""
    return [
        {
            name: (
                {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
                if isinstance(value, torch.Tensor)
                else {"value": repr(value)}
            )
            for name, value in sorted(batch.items())
        }
        for batch in batches
    ]


def sequence_length(batch: Batch) -> int | None:
    ids = batch.get("input_ids")
    if isinstance(ids, torch.Tensor) and ids.dim() >= 2:
        return int(ids.shape[-1])
    return None


def at_sequence_length(batch: Batch, length: int) -> Batch:
    """The same batch cut or tiled to ``length`` tokens (every 2-D+ token tensor along dim -1)."""
    current = sequence_length(batch)
    if current is None:
        return dict(batch)
    resized: Batch = {}
    for name, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[-1] == current:
            repeats = -(-length // current)
            value = value.tile((1,) * (value.dim() - 1) + (repeats,))
            value = value[..., :length].contiguous()
        resized[name] = value
    return resized


def second_length(batch: Batch) -> int | None:
    """A different sequence length to catch shape-baked graphs (half, or double when tiny)."""
    current = sequence_length(batch)
    if current is None:
        return None
    return current // 2 if current >= 4 else current * 2


def synthesize_from_signature(inputs: list[dict[str, Any]]) -> list[Batch]:
    """Batches with a plan's input names, shapes and dtypes (ones for masks, zeros elsewhere)."""
    batches = []
    for batch in inputs:
        made: Batch = {}
        for name, spec in batch.items():
            if "shape" not in spec:
                continue
            fill = torch.ones if "mask" in name else torch.zeros
            made[name] = fill(spec["shape"], dtype=getattr(torch, spec["dtype"]))
        batches.append(made)
    return batches


def typical_inputs(model: Any, reserve: int = 0) -> list[Batch]:
    """Inputs for a model given without any: one row of DEFAULT_SEQ_LEN valid token ids and a
    full mask (fewer tokens when the model's context, less ``reserve`` tokens to generate, is
    shorter), one image for a vision model, one second of audio for an audio model."""
    config = getattr(model, "config", None)
    context = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None
    )
    length = DEFAULT_SEQ_LEN
    if isinstance(context, int) and context > 0:
        length = max(1, min(length, context - reserve))
    return [synthesize_inputs(model, DEFAULT_BATCH_SIZE, length)]


#: Samples of made-up audio: one second at the 16 kHz that speech models are trained on.
AUDIO_SAMPLES = 16_000
#: Choices per row of made-up multiple-choice inputs.
CHOICES = 2
#: Image side when the config states none (the ImageNet size most vision models use).
IMAGE_SIZE = 224


def synthesize_inputs(
    model: Any, batch_size: int, seq_len: int, model_dir: str | None = None
) -> Batch:
    """Inputs of the kind ``model`` takes (its ``main_input_name``): token ids from the
    tokenizer in ``model_dir`` when it has one, else valid ids from the config; images or
    audio of the config's size. Multiple-choice heads get ``CHOICES`` choices per row and
    encoder-decoders ``decoder_input_ids`` (the ids shifted right, as training feeds them)."""
    if batch_size < 1 or seq_len < 1:
        raise AutocpuError(
            f"batch size {batch_size} and sequence length {seq_len} must be positive",
            "pass --batch-size and --seq-len of 1 or more",
        )
    from autocpu.models import infer_task

    config = getattr(model, "config", None)
    main_input = getattr(model, "main_input_name", "input_ids")
    generator = torch.Generator().manual_seed(0)
    if main_input == "pixel_values":
        size = getattr(config, "image_size", None) or IMAGE_SIZE
        side = size if isinstance(size, int) else int(size[0])
        shape = (batch_size, int(getattr(config, "num_channels", 3)), side, side)
        return {"pixel_values": torch.randn(shape, generator=generator)}
    if main_input == "input_values":
        return {"input_values": torch.randn(batch_size, AUDIO_SAMPLES, generator=generator)}
    if main_input != "input_ids":
        raise AutocpuError(
            f"autocpu cannot make up inputs for {type(model).__name__}, whose main input is "
            f"{main_input!r}",
            "pass example_inputs (the processor's output for a few real samples)",
        )
    batch = _token_batch(model_dir, config, batch_size, seq_len, generator)
    if infer_task(model) == "multiple-choice":
        batch = {k: v.unsqueeze(1).expand(-1, CHOICES, -1).contiguous() for k, v in batch.items()}
    if getattr(config, "is_encoder_decoder", False):
        start = getattr(config, "decoder_start_token_id", None)
        start = start if isinstance(start, int) else int(getattr(config, "pad_token_id", 0) or 0)
        ids = batch["input_ids"]
        batch["decoder_input_ids"] = torch.cat(
            [torch.full_like(ids[:, :1], start), ids[:, :-1]], dim=1
        )
    # Only what forward takes: a tokenizer may return token_type_ids for a model without token
    # types, and an encoder-only class can keep its encoder-decoder config.
    return _accepted(model, batch)


def _accepted(model: Any, batch: Batch) -> Batch:
    """The inputs ``model.forward`` takes."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return batch
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return batch
    return {name: value for name, value in batch.items() if name in parameters}


def _token_batch(
    model_dir: str | None,
    config: Any,
    batch_size: int,
    seq_len: int,
    generator: torch.Generator,
) -> Batch:
    """``input_ids`` and ``attention_mask`` (and ``token_type_ids`` where the config has
    token types) of ``seq_len`` tokens: a tokenizer's, else random ids below the vocabulary."""
    tokenizer = _load_tokenizer(model_dir) if model_dir else None
    if tokenizer is not None:
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        text = _FILLER * (seq_len // 8 + 1)
        return dict(
            tokenizer(
                [text] * batch_size,
                padding="max_length",
                truncation=True,
                max_length=seq_len,
                return_tensors="pt",
            )
        )
    vocab = int(getattr(config, "vocab_size", 1000) or 1000)
    batch: Batch = {
        "input_ids": torch.randint(0, vocab, (batch_size, seq_len), generator=generator),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
    }
    if getattr(config, "type_vocab_size", 0):
        batch["token_type_ids"] = torch.zeros(batch_size, seq_len, dtype=torch.long)
    return batch


def _load_tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError, AttributeError):  # a Llama folder without one: None
        return None
