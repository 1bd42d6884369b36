"""The PyTorch backends build real candidates whose outputs match fp32 eager."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna
import pytest
import torch
import transformers
from conftest import MASKING_UTILS, VOCAB, tiny_inputs, tiny_model

from autocpu.accuracy import Tolerance, compare_outputs
from autocpu.backends import BuildContext, all_backends, get_backend
from autocpu.backends.eager import conv1d_to_linear, precisions_for, torchao_installed
from autocpu.errors import AutocpuError
from autocpu.hardware import probe
from autocpu.inputs import at_sequence_length
from autocpu.models import make_spec

MODELS = [
    ("bert", "AutoModel"),
    ("distilbert", "AutoModelForSequenceClassification"),
    ("roberta", "AutoModelForMaskedLM"),
    ("gpt2", "AutoModelForCausalLM"),
]


def build(backend_name, model, inputs, params, tmp_path):
    backend = get_backend(backend_name)
    spec = make_spec(model)
    ctx = BuildContext(probe(), [inputs], tmp_path)
    return backend.bind(backend.build(spec, params, ctx), params)


def reference(model, inputs):
    with torch.inference_mode():
        return model(**inputs)


def test_registry_discovers_every_backend_file():
    names = [b.name for b in all_backends()]
    assert {"eager", "torchscript", "torch_compile"} <= set(names)
    assert names[0] == "eager"  # simplest first
    with pytest.raises(AutocpuError, match="unknown backend 'nope'"):
        get_backend("nope")


@pytest.mark.parametrize(("kind", "head"), MODELS)
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_eager_fp32_both_attentions_match(kind, head, attention, tmp_path):
    model, inputs = tiny_model(kind, head), tiny_inputs(kind)
    runner = build(
        "eager",
        model,
        inputs,
        {"attention": attention, "precision": "fp32", "threads": 1},
        tmp_path,
    )
    report = compare_outputs(reference(model, inputs), runner(**inputs), Tolerance.strict())
    assert report.passed, report.failures
    assert torch.get_num_threads() == 1
    torch.set_num_threads(probe().usable_cpus)


@pytest.mark.parametrize("precision", [p for p in precisions_for(probe()) if p != "fp32"])
@pytest.mark.parametrize(("kind", "head"), [MODELS[0], MODELS[3]])
def test_eager_low_precision_stays_close_and_returns_fp32(kind, head, precision, tmp_path):
    model, inputs = tiny_model(kind, head), tiny_inputs(kind)
    runner = build("eager", model, inputs, {"attention": "sdpa", "precision": precision}, tmp_path)
    out = runner(**inputs)
    ref = reference(model, inputs)
    report = compare_outputs(ref, out, Tolerance.int8())
    assert report.passed, report.failures
    first = next(iter(v for v in out.values() if isinstance(v, torch.Tensor)))
    assert first.dtype == torch.float32
    assert report.max_abs > 0  # really ran in another precision
    assert next(model.parameters()).dtype == torch.float32  # user's model untouched


def tiny_mpnet() -> torch.nn.Module:
    """A class without SDPA support in transformers 4.57 (``_supports_sdpa = False``)."""
    config = transformers.MPNetConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        vocab_size=VOCAB,
    )
    return transformers.AutoModelForSequenceClassification.from_config(config).eval()


def eager_attentions(model: torch.nn.Module, trials: int = 20) -> set[str]:
    """Every attention the eager backend proposes for ``model``: its queued defaults and lossy
    recipes first (as the search queues them), then random draws of its space."""
    backend, spec, hw = get_backend("eager"), make_spec(model), probe()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    queued = [backend.defaults(hw), *backend.lossy_defaults(spec, hw)]
    for params in queued:
        study.enqueue_trial({backend.key(k): v for k, v in params.items()})
    seen = set()
    for _ in range(len(queued) + trials):
        seen.add(backend.suggest(study.ask(), spec, hw)["attention"])
    return seen


def test_eager_offers_sdpa_only_to_classes_that_support_it(tmp_path):
    mpnet = tiny_mpnet()
    assert eager_attentions(mpnet) == {"eager"}
    assert all(
        p["attention"] == "eager"
        for p in get_backend("eager").lossy_defaults(make_spec(mpnet), probe())
    )
    assert eager_attentions(tiny_model("bert")) == {"eager", "sdpa"}
    inputs = tiny_inputs("distilbert")  # MPNet takes no token_type_ids
    runner = build("eager", mpnet, inputs, {"attention": "eager", "precision": "fp32"}, tmp_path)
    assert compare_outputs(reference(mpnet, inputs), runner(**inputs), Tolerance.strict()).passed


def test_gpt2_conv1d_becomes_linear_with_identical_outputs():
    model, inputs = tiny_model("gpt2", "AutoModelForCausalLM"), tiny_inputs("gpt2")
    ref = reference(model, inputs)
    conv1d_to_linear(model)
    from transformers.pytorch_utils import Conv1D

    assert not any(isinstance(m, Conv1D) for m in model.modules())
    assert compare_outputs(ref, reference(model, inputs), Tolerance.strict()).passed


@pytest.mark.parametrize(("kind", "head"), MODELS)
@pytest.mark.parametrize("freeze", [False, True])
def test_torchscript_matches_and_handles_a_second_length(kind, head, freeze, tmp_path):
    model, inputs = tiny_model(kind, head), tiny_inputs(kind, seq=16)
    runner = build(
        "torchscript", model, inputs, {"freeze": freeze, "optimize": freeze, "threads": 2}, tmp_path
    )
    out = runner(**inputs)
    ref = reference(model, inputs)
    assert type(out) is type(ref)
    assert compare_outputs(ref, out, Tolerance.strict()).passed
    shorter = at_sequence_length(inputs, 8)
    if kind == "gpt2" and MASKING_UTILS:  # the trace bakes in the length: the search's
        with pytest.raises(RuntimeError):  # second-length check keeps such a graph from winning
            runner(**shorter)
        return
    assert compare_outputs(reference(model, shorter), runner(**shorter), Tolerance.strict()).passed


def test_torchscript_falls_back_to_eager_for_other_input_names(tmp_path):
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    runner = build("torchscript", model, inputs, {"freeze": True, "optimize": False}, tmp_path)
    fewer = {"input_ids": inputs["input_ids"]}
    assert compare_outputs(reference(model, fewer), runner(**fewer), Tolerance.strict()).passed


@pytest.mark.skipif(not MASKING_UTILS, reason="transformers without masking_utils")
def test_gpt2_trace_leaves_transformers_masking_as_it_was(tmp_path):
    from transformers import masking_utils

    before = (
        masking_utils.sdpa_mask,
        dict(masking_utils.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping),
    )
    model, inputs = tiny_model("gpt2", "AutoModelForCausalLM"), tiny_inputs("gpt2")
    build("torchscript", model, inputs, {"freeze": True, "optimize": False}, tmp_path)
    assert masking_utils.sdpa_mask is before[0]
    assert dict(masking_utils.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping) == before[1]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "head"), [MODELS[0], MODELS[3]])
def test_torch_compile_matches(kind, head, tmp_path):
    model, inputs = tiny_model(kind, head), tiny_inputs(kind)
    runner = build(
        "torch_compile",
        model,
        inputs,
        {"freezing": False, "max_autotune": False, "threads": 2},
        tmp_path,
    )
    report = compare_outputs(reference(model, inputs), runner(**inputs), Tolerance.strict())
    assert report.passed, report.failures


needs_torchao = pytest.mark.skipif(not torchao_installed(), reason="torchao not installed")


@needs_torchao
@pytest.mark.parametrize(
    ("precision", "group_size", "close"), [("int8_weights", 128, 0.999), ("int4_weights", 32, 0.95)]
)
def test_eager_torchao_weights_are_quantized_and_generate(precision, group_size, close, tmp_path):
    """torchao weight-only int8/int4: the Linear weights become torchao tensors (the user's
    model keeps its fp32 ones), the logits stay close, and generate() runs on them."""
    model, inputs = tiny_model("llama", "AutoModelForCausalLM"), tiny_inputs("llama")
    params = {"attention": "sdpa", "precision": precision, "group_size": group_size}
    runner = build("eager", model, inputs, params, tmp_path)
    built = runner.fn
    assert type(built.model.layers[0].mlp.up_proj.weight) not in (torch.Tensor, torch.nn.Parameter)
    assert type(model.model.layers[0].mlp.up_proj.weight) is torch.nn.Parameter
    ref, out = reference(model, inputs).logits, runner(**inputs).logits
    cos = torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0)
    assert close < cos < 1.0
    prompt = inputs["input_ids"][:1]
    tokens = built.generate(prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert tokens.shape == (1, prompt.shape[1] + 3)


@needs_torchao
def test_eager_offers_torchao_weights_for_generation_only():
    spec, hw = make_spec(tiny_model("llama", "AutoModelForCausalLM")), probe()
    backend = get_backend("eager")
    generate = dataclasses.replace(spec, workload="generate")
    assert "int8_weights" not in precisions_for(hw, spec, int4=True)
    assert "int4_weights" not in precisions_for(hw, generate, int4=False)
    assert {"int8_weights", "int4_weights"} <= set(precisions_for(hw, generate, int4=True))
    assert backend.int4_defaults(spec, hw) == []
    assert [p["group_size"] for p in backend.int4_defaults(generate, hw)] == [32]
    with pytest.raises(AutocpuError, match="unknown group_size=48"):
        params = {"attention": "sdpa", "precision": "int4_weights", "group_size": 48}
        backend.build(generate, params, BuildContext(hw, [tiny_inputs("llama")], Path(".")))
