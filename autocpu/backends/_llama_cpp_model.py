"""A causal LM served by llama.cpp, called and generating like the transformers model.

:class:`LlamaCppCausalLM` is a transformers ``GenerationMixin``: ``generate()`` keeps all of
transformers' own preparation (generation config, logits processors, stopping criteria, EOS and
padding rules, streamers, ``return_dict_in_generate``), and only the decoding loop of greedy
search and sampling (``_sample``) runs on llama.cpp's KV cache, one llama.cpp batch per step
for every row. Token ids go in and come out; the GGUF file holds no vocabulary, so the user's
tokenizer stays the only one. Strategies that call the model's forward themselves (beam search,
contrastive search) get full-sequence logits on every step: right, without a KV cache.

The engine is a small interface (:class:`~autocpu.backends._llama_cpp_engine.Engine`) that
:class:`~autocpu.backends._llama_cpp_engine.LlamaCppEngine` implements on llama.cpp. This module
imports transformers' generation code (seconds): the backend imports it only to bind.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from transformers import GenerationMixin
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.modeling_outputs import CausalLMOutputWithPast

from autocpu.backends._llama_cpp_engine import Engine


def _real_positions(input_ids: torch.Tensor, mask: torch.Tensor | None) -> list[list[int]]:
    """Per row, the indices of its real tokens (all of them without a mask)."""
    rows, length = input_ids.shape
    if mask is None:
        return [list(range(length))] * rows
    return [row.nonzero().flatten().tolist() for row in mask]


class LlamaCppCausalLM(GenerationMixin):
    """A causal LM on an :class:`Engine`: ``model(**inputs).logits`` and ``generate()``.

    ``config`` and ``generation_config`` are the original model's, so generation defaults
    (EOS, pad token, sampling settings) are the ones the user's model has. One call at a time:
    the engine has one KV cache, so concurrent calls are serialised.
    """

    main_input_name = "input_ids"
    _is_stateful = False

    def __init__(self, engine: Engine, config: Any, generation_config: Any) -> None:
        self.engine = engine
        self.config = config
        self.generation_config = generation_config
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def can_generate(self) -> bool:
        return True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """No transformers cache: llama.cpp keeps the KV cache itself."""
        return False

    def __call__(self, *args: Any, **kwargs: Any) -> CausalLMOutputWithPast:
        return self.forward(*args, **kwargs)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **_: Any,
    ) -> CausalLMOutputWithPast:
        """Logits at every real token, from an empty cache (padding positions are zeros).

        A row's real tokens take positions 0, 1, ... (generate()'s own for left padding) unless
        ``position_ids`` gives theirs.
        """
        rows, length = input_ids.shape
        real = _real_positions(input_ids, attention_mask)
        tokens, positions, seq = [], [], []
        for row, indices in enumerate(real):
            ids = input_ids[row, indices].tolist()
            places = (
                position_ids[row, indices].tolist()
                if position_ids is not None
                else list(range(len(indices)))
            )
            tokens += ids
            positions += places
            seq += [row] * len(ids)
        with self._lock:
            self.engine.reset(rows, max(max(positions, default=0) + 1, length))
            flat = self.engine.decode(tokens, positions, seq, [True] * len(tokens))
        logits = torch.zeros(rows, length, self.engine.n_vocab)
        done = 0
        for row, indices in enumerate(real):
            logits[row, indices] = torch.from_numpy(flat[done : done + len(indices)])
            done += len(indices)
        return CausalLMOutputWithPast(logits=logits)

    def _sample(
        self,
        input_ids: torch.LongTensor,
        logits_processor: Any,
        stopping_criteria: Any,
        generation_config: Any,
        synced_gpus: bool = False,
        streamer: Any = None,
        **model_kwargs: Any,
    ) -> GenerateDecoderOnlyOutput | torch.LongTensor:
        """transformers' greedy / multinomial decoding loop, each step's logits from llama.cpp
        (every row's next token in one decode call, on its own KV cache sequence)."""
        with self._lock:
            return self._decode_loop(
                input_ids,
                logits_processor,
                stopping_criteria,
                generation_config,
                streamer,
                model_kwargs.get("attention_mask"),
            )

    def _decode_loop(
        self,
        input_ids: torch.LongTensor,
        logits_processor: Any,
        stopping_criteria: Any,
        config: Any,
        streamer: Any,
        attention_mask: torch.Tensor | None,
    ) -> GenerateDecoderOnlyOutput | torch.LongTensor:
        pad = config._pad_token_tensor
        has_eos = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
        keep = config.return_dict_in_generate
        scores: tuple | None = () if keep and config.output_scores else None
        raw: tuple | None = () if keep and config.output_logits else None
        rows, length = input_ids.shape
        unfinished = torch.ones(rows, dtype=torch.long)

        real = _real_positions(input_ids, attention_mask)
        tokens, positions, seq, wanted = [], [], [], []
        for row, indices in enumerate(real):
            tokens += input_ids[row, indices].tolist()
            positions += list(range(len(indices)))
            seq += [row] * len(indices)
            wanted += [False] * (len(indices) - 1) + [True]
        next_position = [len(indices) for indices in real]
        self.engine.reset(rows, max(int(config.max_length), length))
        logits = self.engine.decode(tokens, positions, seq, wanted)
        row_ids = list(range(rows))
        while True:
            next_logits = torch.from_numpy(logits)
            next_scores = logits_processor(input_ids, next_logits)
            if scores is not None:
                scores += (next_scores,)
            if raw is not None:
                raw += (next_logits,)
            if config.do_sample:
                probs = torch.nn.functional.softmax(next_scores, dim=-1)
                next_tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
            else:
                next_tokens = torch.argmax(next_scores, dim=-1)
            if has_eos:
                next_tokens = next_tokens * unfinished + pad * (1 - unfinished)
            input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
            if streamer is not None:
                streamer.put(next_tokens.cpu())
            unfinished = unfinished & ~stopping_criteria(input_ids, scores)
            if unfinished.max() == 0:
                break
            logits = self.engine.decode(next_tokens.tolist(), next_position, row_ids, [True] * rows)
            next_position = [position + 1 for position in next_position]
        if streamer is not None:
            streamer.end()
        if keep:
            return GenerateDecoderOnlyOutput(sequences=input_ids, scores=scores, logits=raw)
        return input_ids
