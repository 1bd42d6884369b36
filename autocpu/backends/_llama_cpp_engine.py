"""llama.cpp's C API as a small engine: a GGUF model, a KV cache per row, logits per token.

:class:`LlamaCppEngine` drives llama.cpp through llama-cpp-python's ctypes bindings, imported
only when an engine is made; :class:`Engine` is the interface the causal LM built on it
(:mod:`autocpu.backends._llama_cpp_model`) needs, so the decoding loop is the same whatever
keeps the cache.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from autocpu.errors import AutocpuError

log = logging.getLogger(__name__)

#: Tokens handed to llama.cpp per decode call (longer prompts go in several calls).
BATCH_TOKENS = 512
#: Context sizes grow in steps of this many tokens, so one request does not make the next
#: slightly longer one rebuild the context.
CONTEXT_STEP = 256
#: The KV cache precisions llama.cpp keeps, as its ggml type ids (a quantized V cache needs
#: flash attention).
KV_CACHE_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}


class Engine(Protocol):
    """What the model needs of an inference engine that keeps one KV cache per row."""

    n_vocab: int

    def reset(self, rows: int, tokens_per_row: int) -> None:
        """Empty the KV cache and make room for ``rows`` sequences of ``tokens_per_row``."""

    def decode(
        self,
        tokens: Sequence[int],
        positions: Sequence[int],
        rows: Sequence[int],
        wanted: Sequence[bool],
    ) -> np.ndarray:
        """Append the tokens to their rows' caches; the logits of the ``wanted`` ones, in
        order, as a ``(sum(wanted), n_vocab)`` float32 array."""


@dataclass(frozen=True)
class EngineSettings:
    """llama.cpp's runtime settings: decode and prompt threads, attention kernel, KV cache."""

    threads: int
    batch_threads: int
    flash_attention: bool = False
    kv_cache: str = "f32"


#: ggml's log level of errors.
_LOG_LEVEL_ERROR = 4


class _LastError:
    """The last error llama.cpp logged: its C API answers failures with a null pointer only."""

    message = ""


@functools.cache
def llama_library() -> Any:
    """llama-cpp-python's bindings, initialised once, with llama.cpp's log (loader chatter on
    stderr by default) sent to this module's logger at debug level."""
    import llama_cpp

    @llama_cpp.llama_log_callback
    def forward_log(level: int, text: bytes, _: Any) -> None:
        message = text.decode("utf-8", "replace").rstrip()
        if message:
            log.debug(message)
            if level == _LOG_LEVEL_ERROR:
                _LastError.message = message

    llama_library.log_callback = forward_log  # type: ignore[attr-defined]  # C keeps a pointer
    llama_cpp.llama_log_set(forward_log, None)
    llama_cpp.llama_backend_init()
    return llama_cpp


def _failure(what: str) -> str:
    """``what`` and, when llama.cpp logged one since the last failure, its reason."""
    reason, _LastError.message = _LastError.message, ""
    return f"{what} ({reason})" if reason else what


class _Handles:
    """The C objects an engine owns, freed together (also when the engine is collected)."""

    def __init__(self, llama: Any) -> None:
        self.llama = llama
        self.model: Any = None
        self.context: Any = None
        self.batch: Any = None

    def free_context(self) -> None:
        if self.context:
            self.llama.llama_free(self.context)
        self.context = None

    def free(self) -> None:
        self.free_context()
        if self.batch is not None:
            self.llama.llama_batch_free(self.batch)
            self.batch = None
        if self.model:
            self.llama.llama_model_free(self.model)
        self.model = None


class LlamaCppEngine:
    """A GGUF model in llama.cpp, with a context that grows to the rows and lengths asked for
    (the KV cache unified over rows, one sequence id per row)."""

    def __init__(self, path: Path, settings: EngineSettings) -> None:
        if settings.kv_cache not in KV_CACHE_TYPES:
            raise AutocpuError(
                f"unknown kv_cache={settings.kv_cache!r}", f"use one of {sorted(KV_CACHE_TYPES)}"
            )
        if settings.kv_cache == "q8_0" and not settings.flash_attention:
            raise AutocpuError(
                "llama.cpp keeps a q8_0 KV cache only with flash attention",
                "set flash_attention=True or kv_cache='f16'",
            )
        llama = llama_library()
        self.settings = settings
        self._handles = _Handles(llama)
        weakref.finalize(self, self._handles.free)
        _LastError.message = ""
        self._handles.model = llama.llama_model_load_from_file(
            str(path).encode(), llama.llama_model_default_params()
        )
        if not self._handles.model:
            raise AutocpuError(
                _failure(f"llama.cpp cannot load {path}"),
                "build the candidate again (deleting artifacts is safe), or upgrade llama-cpp-python",
            )
        self._handles.batch = llama.llama_batch_init(BATCH_TOKENS, 0, 1)
        self.n_vocab = int(
            llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(self._handles.model))
        )
        self._rows = 0
        self._capacity = 0

    def reset(self, rows: int, tokens_per_row: int) -> None:
        needed = rows * tokens_per_row
        if rows > self._rows or needed > self._capacity:
            self._make_context(max(rows, self._rows), max(needed, self._capacity))
        llama = self._handles.llama
        llama.llama_memory_clear(llama.llama_get_memory(self._handles.context), True)

    def _make_context(self, rows: int, tokens: int) -> None:
        llama, settings = self._handles.llama, self.settings
        capacity = -(-tokens // CONTEXT_STEP) * CONTEXT_STEP
        self._handles.free_context()
        params = llama.llama_context_default_params()
        params.n_ctx = capacity
        params.n_batch = params.n_ubatch = BATCH_TOKENS
        params.n_seq_max = rows
        params.kv_unified = True
        params.n_threads = settings.threads
        params.n_threads_batch = settings.batch_threads
        params.flash_attn_type = int(settings.flash_attention)
        params.type_k = params.type_v = KV_CACHE_TYPES[settings.kv_cache]
        params.no_perf = True
        _LastError.message = ""
        self._handles.context = llama.llama_init_from_model(self._handles.model, params)
        if not self._handles.context:
            self._rows = self._capacity = 0
            raise AutocpuError(
                _failure(
                    f"llama.cpp could not make a context of {capacity} tokens for {rows} rows"
                ),
                "use other llama.cpp settings, or shorter prompts",
            )
        self._rows, self._capacity = rows, capacity

    def decode(
        self,
        tokens: Sequence[int],
        positions: Sequence[int],
        rows: Sequence[int],
        wanted: Sequence[bool],
    ) -> np.ndarray:
        llama, batch = self._handles.llama, self._handles.batch
        found = np.empty((sum(wanted), self.n_vocab), dtype=np.float32)
        done = 0
        for start in range(0, len(tokens), BATCH_TOKENS):
            stop = min(start + BATCH_TOKENS, len(tokens))
            batch.n_tokens = stop - start
            for slot, index in enumerate(range(start, stop)):
                batch.token[slot] = tokens[index]
                batch.pos[slot] = positions[index]
                batch.n_seq_id[slot] = 1
                batch.seq_id[slot][0] = rows[index]
                batch.logits[slot] = wanted[index]
            status = llama.llama_decode(self._handles.context, batch)
            if status != 0:
                raise AutocpuError(
                    f"llama.cpp failed to decode ({status}: "
                    f"{'no room left in the KV cache' if status == 1 else 'an internal error'})",
                    "report this with the plan's settings",
                )
            count = sum(wanted[start:stop])
            if count:
                logits = llama.llama_get_logits(self._handles.context)
                found[done : done + count] = np.ctypeslib.as_array(
                    logits, shape=(count, self.n_vocab)
                )
                done += count
        return found
