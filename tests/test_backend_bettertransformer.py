"""BetterTransformer backend: refused with the reason (and its successor) where optimum dropped it;
tuned for real where it is still there (the legacy lane: optimum 1.27, transformers 4.48)."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
import transformers
from conftest import tiny_inputs, tiny_model
from engine_cases import assert_matches_at_two_lengths, reference

import autocpu
from autocpu.accuracy import Tolerance, compare_outputs
from autocpu.backends import BuildContext, get_backend
from autocpu.backends.bettertransformer import SUCCESSOR, import_problem
from autocpu.errors import AutocpuError
from autocpu.hardware import probe
from autocpu.models import make_spec

HW = probe()
BACKEND = get_backend("bettertransformer")
ELIGIBLE = BACKEND.availability(None, HW).ok
needs_bt = pytest.mark.skipif(not ELIGIBLE, reason="BetterTransformer runs only in the legacy lane")
MODELS = [
    ("bert", "AutoModel"),
    ("distilbert", "AutoModelForSequenceClassification"),
    ("roberta", "AutoModelForMaskedLM"),
    ("gpt2", "AutoModelForCausalLM"),
]


@pytest.mark.skipif(ELIGIBLE, reason="BetterTransformer is available here")
def test_where_optimum_dropped_it_the_reason_names_the_version_and_the_successor(cache_dir):
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    tuned = autocpu.tune(
        model, inputs, n_trials=1, backends=["eager", "bettertransformer"], isolation="none"
    )
    skipped = [t for t in tuned.plan.trials if t.backend == "bettertransformer"]
    assert [t.status for t in skipped] == ["ineligible"]
    version = importlib.metadata.version("optimum")
    assert skipped[0].reason.startswith(
        f"optimum {version} no longer provides BetterTransformer ({import_problem()})"
    )
    assert "attention=sdpa in the eager backend) is its successor" in skipped[0].reason
    assert "\n" not in skipped[0].reason
    assert not any(t.backend == "bettertransformer" and t.status == "ok" for t in tuned.plan.trials)


@pytest.mark.skipif(ELIGIBLE, reason="BetterTransformer is available here")
def test_a_plan_for_it_applied_where_optimum_dropped_it_fails_with_the_reason(tmp_path):
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    with pytest.raises(AutocpuError, match="no longer provides BetterTransformer"):
        build(model, inputs, {"precision": "fp32"}, tmp_path)


@needs_bt
def test_unsupported_model_types_are_refused_with_optimums_reason():
    llama = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    refused = BACKEND.availability(make_spec(transformers.LlamaModel(llama)), HW)
    assert not refused.ok and "'llama'" in refused.reason and refused.fix == SUCCESSOR
    deberta = transformers.DebertaV2Config(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
    )
    refused = BACKEND.availability(make_spec(transformers.DebertaV2Model(deberta)), HW)
    assert not refused.ok and "does not use a regular attention mechanism" in refused.reason
    assert BACKEND.availability(make_spec(tiny_model("bert")), HW).ok


def build(model, inputs, params, tmp_path):
    built = BACKEND.build(make_spec(model), params, BuildContext(HW, [inputs], tmp_path))
    return BACKEND.bind(built, params)


@needs_bt
@pytest.mark.parametrize(("kind", "head"), MODELS)
def test_fp32_candidates_match_eager_on_real_tokens_at_two_lengths(kind, head, tmp_path):
    model, inputs = tiny_model(kind, head), tiny_inputs(kind)
    runner = build(model, inputs, {"precision": "fp32", "threads": 2}, tmp_path)
    converted = {type(m).__name__ for m in runner.fn.modules()}
    assert any("BetterTransformer" in name for name in converted), converted
    assert_matches_at_two_lengths(runner, model, inputs)
    assert model.config._attn_implementation == "sdpa"  # the user's model is untouched


@needs_bt
@pytest.mark.skipif(not HW.native_bf16, reason="no native bf16 on this CPU")
def test_bf16_stays_within_bf16_and_returns_fp32(tmp_path):
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    out = build(model, inputs, {"precision": "bf16"}, tmp_path)(**inputs)
    report = compare_outputs(
        reference(model, inputs), out, Tolerance.bf16(), inputs["attention_mask"]
    )
    assert report.passed and report.max_abs > 0, report.failures
    assert out.last_hidden_state.dtype == torch.float32


@needs_bt
def test_tune_runs_bettertransformer_and_its_model_matches_eager(cache_dir):
    model = tiny_model("distilbert", "AutoModelForSequenceClassification")
    inputs = tiny_inputs("distilbert")
    tuned = autocpu.tune(model, inputs, n_trials=2, backends=["bettertransformer"])
    trials = [t for t in tuned.plan.trials if t.backend == "bettertransformer"]
    assert trials and all(t.status == "ok" for t in trials), trials
    # On a model this small BetterTransformer may or may not beat eager beyond noise: check the
    # winner if it won, and the BetterTransformer candidate itself either way.
    assert tuned.plan.backend in ("bettertransformer", "eager"), tuned.plan.decision
    forced = autocpu.apply_plan(model, _with_backend(tuned.plan, trials[0]), inputs)
    for candidate in (tuned, forced):
        report = compare_outputs(
            reference(model, inputs),
            candidate(**inputs),
            Tolerance.strict(),
            inputs["attention_mask"],
        )
        assert report.passed, report.failures


def _with_backend(plan, trial):
    import dataclasses

    return dataclasses.replace(plan, backend=trial.backend, params=trial.params)
