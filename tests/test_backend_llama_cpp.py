"""llama.cpp backend: the decoding loop (on any engine), and real GGUF conversions of tiny models.

The decoding loop and the forward pass of :class:`LlamaCppCausalLM` are checked against
transformers' own ``generate()`` on an engine that keeps a transformers KV cache per row
(:class:`TorchEngine`), so they run wherever torch does. Conversion, quantization and llama.cpp
itself need the ``llamacpp`` extra (llama-cpp-python builds from source, so it is no test
dependency); those tests skip without it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import torch
import transformers
from conftest import tiny_model, write_tokenizer

import autocpu
from autocpu.backends._llama_cpp_model import LlamaCppCausalLM
from autocpu.backends.base import BuildContext
from autocpu.backends.llama_cpp import LOW_BIT_WEIGHTS, LlamaCppBackend
from autocpu.errors import AutocpuError
from autocpu.hardware import probe
from autocpu.models import make_spec

HAVE_LLAMA_CPP = all(
    importlib.util.find_spec(name) is not None for name in ("llama_cpp", "conversion")
)
needs_llama_cpp = pytest.mark.skipif(
    not HAVE_LLAMA_CPP, reason="pip install 'autocpu[llamacpp]' (builds llama.cpp from source)"
)
ROOT = Path(__file__).resolve().parents[1]


class TorchEngine:
    """The engine interface on a transformers model: one DynamicCache per row."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.n_vocab = model.config.vocab_size
        self.caches: list[transformers.DynamicCache] = []
        self.calls = 0

    def reset(self, rows: int, tokens_per_row: int) -> None:
        self.caches = [transformers.DynamicCache() for _ in range(rows)]

    @torch.inference_mode()
    def decode(
        self,
        tokens: Sequence[int],
        positions: Sequence[int],
        rows: Sequence[int],
        wanted: Sequence[bool],
    ) -> np.ndarray:
        self.calls += 1
        found: dict[int, np.ndarray] = {}
        for row in dict.fromkeys(rows):
            indices = [i for i, r in enumerate(rows) if r == row]
            logits = self.model(
                input_ids=torch.tensor([[tokens[i] for i in indices]]),
                position_ids=torch.tensor([[positions[i] for i in indices]]),
                past_key_values=self.caches[row],
                use_cache=True,
            ).logits[0]
            found.update({i: logits[k].numpy() for k, i in enumerate(indices) if wanted[i]})
        return np.stack([found[i] for i in sorted(found)])


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return tiny_model("llama", "AutoModelForCausalLM")


def left_padded(rows: int = 3, length: int = 10, seed: int = 3) -> dict[str, torch.Tensor]:
    """Prompts of several lengths, padded on the left as generation wants them."""
    ids = torch.randint(3, 100, (rows, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row in range(1, rows):
        mask[row, : 2 * row] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def on_torch_engine(model: torch.nn.Module) -> LlamaCppCausalLM:
    return LlamaCppCausalLM(TorchEngine(model), model.config, model.generation_config)


GENERATE_CASES = {
    "greedy": {"max_new_tokens": 8, "do_sample": False},
    "min and max, two EOS ids": {
        "max_new_tokens": 24,
        "min_new_tokens": 4,
        "eos_token_id": [19, 11],
        "do_sample": False,
    },
    "repetition penalty": {"max_new_tokens": 12, "repetition_penalty": 1.5, "do_sample": False},
    "sampling": {"max_new_tokens": 10, "do_sample": True, "top_k": 20, "temperature": 0.7},
    "beam search (forward only)": {"max_new_tokens": 5, "num_beams": 3, "do_sample": False},
}


@pytest.mark.parametrize("case", list(GENERATE_CASES))
def test_generate_on_an_engine_matches_transformers(llama, case):
    kwargs = {**GENERATE_CASES[case], "pad_token_id": 0}
    inputs = left_padded()
    torch.manual_seed(7)
    expected = llama.generate(**inputs, **kwargs)
    torch.manual_seed(7)
    got = on_torch_engine(llama).generate(**inputs, **kwargs)
    assert torch.equal(got, expected)


def test_finished_rows_are_padded_after_their_eos(llama):
    inputs = left_padded()
    free = llama.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    eos = int(free[0, 10 + 2])  # the first row's third new token ends it
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "eos_token_id": eos}
    got = on_torch_engine(llama).generate(**inputs, **kwargs)
    assert got[0, 10 + 2] == eos
    assert got[0, 10 + 3 :].eq(0).all() or got.shape[1] == 10 + 3
    assert torch.equal(got, llama.generate(**inputs, **kwargs))


def test_each_step_decodes_every_row_in_one_engine_call(llama):
    model = on_torch_engine(llama)
    model.generate(**left_padded(rows=3), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert model.engine.calls == 5  # the prompts, then one call per further token


def test_scores_logits_and_streamer_are_transformers_own(llama):
    inputs = left_padded()
    kwargs = {
        "max_new_tokens": 5,
        "do_sample": False,
        "pad_token_id": 0,
        "return_dict_in_generate": True,
        "output_scores": True,
        "output_logits": True,
    }
    expected = llama.generate(**inputs, **kwargs)
    got = on_torch_engine(llama).generate(**inputs, **kwargs)
    assert type(got) is type(expected)
    assert torch.equal(got.sequences, expected.sequences)
    pairs = [*zip(got.scores, expected.scores, strict=True)]
    pairs += zip(got.logits, expected.logits, strict=True)
    for ours, theirs in pairs:
        assert torch.allclose(ours, theirs, atol=1e-5)

    class Collect:
        def __init__(self) -> None:
            self.seen: list[Any] = []

        def put(self, value: torch.Tensor) -> None:
            self.seen.append(value.tolist())

        def end(self) -> None:
            self.seen.append("end")

    ours, theirs = Collect(), Collect()
    single = {k: v[:1] for k, v in inputs.items()}
    on_torch_engine(llama).generate(**single, max_new_tokens=4, pad_token_id=0, streamer=ours)
    llama.generate(**single, max_new_tokens=4, pad_token_id=0, streamer=theirs)
    assert ours.seen == theirs.seen and ours.seen[-1] == "end"


def test_forward_gives_the_logits_of_every_real_token(llama):
    inputs = left_padded()
    mask = inputs["attention_mask"].bool()
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        expected = llama(**inputs, position_ids=positions).logits
    got = on_torch_engine(llama)(**inputs).logits
    assert got.shape == expected.shape
    assert torch.allclose(got[mask], expected[mask], atol=1e-5)
    assert got[~mask].eq(0).all()


# The backend's rules --------------------------------------------------------------------------


def generation_spec(model: torch.nn.Module) -> Any:
    spec = make_spec(model)
    spec.workload = "generate"
    return spec


def test_import_is_light():
    """The backend module imports neither llama-cpp-python, the converter nor transformers'
    generation code (all blocked here): discovery stays fast and works without them."""
    blocked = ("llama_cpp", "conversion", "transformers")
    code = (
        f"import sys; sys.modules.update(dict.fromkeys({blocked!r}));"
        "import autocpu.backends.llama_cpp as b; print(b.LlamaCppBackend.name)"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["llama_cpp"]


def test_a_missing_package_names_the_extra():
    class Missing(LlamaCppBackend):
        requires = ("no-such-distribution-xyz",)

    found = Missing().availability(None, probe())
    assert not found.ok and found.fix == "pip install 'autocpu[llamacpp]'"


@needs_llama_cpp
def test_only_a_causal_lms_generation_is_eligible(llama):
    backend, hw = LlamaCppBackend(), probe()
    assert backend.availability(generation_spec(llama), hw).ok
    forward = backend.availability(make_spec(llama), hw)
    assert not forward.ok and "workload='generate'" in forward.fix
    encoder = backend.availability(make_spec(tiny_model("bert")), hw)
    assert not encoder.ok and "feature-extraction" in encoder.reason
    ctrl = transformers.CTRLLMHeadModel(
        transformers.CTRLConfig(vocab_size=50, n_embd=16, n_layer=1, n_head=2, dff=16)
    )
    unknown = backend.availability(generation_spec(ctrl), hw)
    assert not unknown.ok and "does not convert CTRLLMHeadModel" in unknown.reason


@pytest.mark.parametrize(
    ("lossy", "int4", "low_bits"), [(False, False, False), (True, False, False), (True, True, True)]
)
def test_the_space_follows_the_tolerance(llama, lossy, int4, low_bits):
    backend, hw = LlamaCppBackend(), probe()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen: list[dict] = []
    for _ in range(60):
        trial = study.ask()
        seen.append(backend.suggest(trial, generation_spec(llama), hw, lossy=lossy, int4=int4))
        study.tell(trial, 1.0)
    weights = {p["weights"] for p in seen}
    assert bool(weights & set(LOW_BIT_WEIGHTS)) == low_bits
    if not lossy:  # fp32-faithful only: f32 weights and cache, no flash attention (f16 inside)
        assert weights == {"f32"}
        assert {(p["kv_cache"], p["flash_attention"]) for p in seen} == {("f32", False)}
    assert all(p["flash_attention"] for p in seen if p["kv_cache"] == "q8_0")
    assert all(1 <= p["batch_threads"] <= max(hw.usable_cpus, 1) for p in seen)


# Real conversions and llama.cpp ---------------------------------------------------------------


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> BuildContext:
    return BuildContext(probe(), [left_padded()], tmp_path_factory.mktemp("gguf"), 6)


def bound(llama: torch.nn.Module, ctx: BuildContext, **params: Any) -> Any:
    backend = LlamaCppBackend()
    params = {**backend.defaults(ctx.hw), **params}
    return backend.bind(backend.build(generation_spec(llama), params, ctx), params)


@needs_llama_cpp
def test_f32_gguf_reproduces_the_model_and_its_greedy_tokens(llama, ctx):
    runner = bound(llama, ctx)
    inputs = left_padded()
    mask = inputs["attention_mask"].bool()
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        expected = llama(**inputs, position_ids=positions).logits
    got = runner(**inputs).logits
    scale = expected[mask].abs().max()
    assert ((got[mask] - expected[mask]).abs().max() / scale) < 1e-4
    kwargs = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(runner.generate(**inputs, **kwargs), llama.generate(**inputs, **kwargs))


@needs_llama_cpp
@pytest.mark.parametrize(("weights", "close"), [("q8_0", 0.999), ("q4_0", 0.95)])
def test_quantized_files_are_made_once_and_stay_close(llama, ctx, weights, close):
    backend = LlamaCppBackend()
    params = {**backend.defaults(ctx.hw), "weights": weights}
    built = backend.build(generation_spec(llama), params, ctx)
    assert built.path.name == weights and built.file.is_file()
    made = built.file.stat().st_mtime_ns
    assert backend.build(generation_spec(llama), params, ctx).file.stat().st_mtime_ns == made
    assert built.file.stat().st_size < (built.path.parent / "f32" / "model.gguf").stat().st_size
    inputs = left_padded(rows=1)
    with torch.inference_mode():
        expected = llama(**inputs).logits.flatten()
    got = backend.bind(built, params)(**inputs).logits.flatten()
    assert torch.nn.functional.cosine_similarity(got, expected, dim=0) > close


@needs_llama_cpp
def test_gpt2_converts_and_generates(ctx):
    gpt2 = tiny_model("gpt2", "AutoModelForCausalLM")
    prompt = {k: v[:1] for k, v in left_padded().items()}
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(
        bound(gpt2, ctx).generate(**prompt, **kwargs), gpt2.generate(**prompt, **kwargs)
    )


@needs_llama_cpp
def test_a_deleted_file_and_a_bad_setting_fail_in_one_line(llama, ctx):
    import shutil

    backend = LlamaCppBackend()
    params = {**backend.defaults(ctx.hw), "weights": "q8_0"}
    built = backend.build(generation_spec(llama), params, ctx)
    with pytest.raises(AutocpuError, match="q8_0 KV cache only with flash attention"):
        backend.bind(built, {**params, "kv_cache": "q8_0", "flash_attention": False})
    with pytest.raises(AutocpuError, match="unknown weights='q3'"):
        backend.build(generation_spec(llama), {**params, "weights": "q3"}, ctx)
    shutil.rmtree(built.path)
    with pytest.raises(AutocpuError, match="build the candidate again"):
        backend.bind(built, params)
    assert backend.build(generation_spec(llama), params, ctx).file.is_file()  # remade


@needs_llama_cpp
@pytest.mark.slow
def test_a_tuned_plan_serves_generate_and_pipelines_on_llama_cpp(llama, tmp_path):
    inputs = left_padded(rows=2)
    tuned = autocpu.tune(llama, inputs, backends=["llama_cpp"], max_new_tokens=6, n_trials=3)
    assert tuned.plan.backend == "llama_cpp", tuned.explain()
    assert tuned.plan.params["weights"] == "f32"  # strict: fp32-faithful only
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    tokenizer = write_tokenizer(tmp_path / "tokenizer")
    text = tokenizer.decode(inputs["input_ids"][0])
    wanted = transformers.pipeline("text-generation", model=llama, tokenizer=tokenizer)(
        text, max_new_tokens=6, do_sample=False
    )
    expected = llama.generate(**inputs, **kwargs)
    calls = []
    llama.forward = lambda *args, **kw: calls.append(1)  # never called: the plan serves all
    try:
        assert torch.equal(tuned.generate(**inputs, **kwargs), expected)
        pipe = transformers.pipeline("text-generation", model=tuned, tokenizer=tokenizer)
        assert pipe(text, max_new_tokens=6, do_sample=False) == wanted
    finally:
        del llama.forward
    assert calls == []
