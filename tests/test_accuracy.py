from __future__ import annotations

import pytest
import torch
from transformers.modeling_outputs import SequenceClassifierOutput

from autocpu.accuracy import Tolerance, compare_outputs
from autocpu.errors import AutocpuError


def test_presets_are_ordered_from_strict_to_loose():
    strict, bf16, int8 = Tolerance.strict(), Tolerance.bf16(), Tolerance.int8()
    assert strict.max_rel < bf16.max_rel < int8.max_rel
    assert strict.min_cosine > bf16.min_cosine > int8.min_cosine
    assert Tolerance.parse("bf16") == bf16
    assert Tolerance.parse(None) == strict
    assert Tolerance.parse(0.01).max_rel == 0.01
    assert Tolerance.parse("0.02").max_rel == 0.02
    assert Tolerance.parse({"max_rel": 0.1, "min_cosine": 0.9}).min_cosine == 0.9


@pytest.mark.parametrize(
    "bad", [-1, 0, "loose", {"max_rel": 0.1, "nope": 1}, {"min_cosine": 2}, float("nan"), [1, 2]]
)
def test_bad_tolerance_is_one_clear_error(bad):
    with pytest.raises(AutocpuError) as info:
        Tolerance.parse(bad)
    assert "\n" not in str(info.value) and "--" in str(info.value)


def test_identical_outputs_pass_and_report_zero():
    ref = SequenceClassifierOutput(logits=torch.randn(4, 3))
    report = compare_outputs(
        ref, SequenceClassifierOutput(logits=ref.logits.clone()), Tolerance.strict()
    )
    assert report.passed and report.max_abs == 0 and report.min_argmax == 1.0


def test_perturbation_is_measured_and_fails_strict_but_passes_loose():
    torch.manual_seed(0)
    ref = {"last_hidden_state": torch.randn(2, 8, 16)}
    noisy = {"last_hidden_state": ref["last_hidden_state"] + 1e-2 * torch.randn(2, 8, 16)}
    strict = compare_outputs(ref, noisy, Tolerance.strict())
    assert not strict.passed
    assert any("relative diff" in f for f in strict.failures)
    assert 1e-3 < strict.max_rel < 3e-2
    assert compare_outputs(ref, noisy, Tolerance.int8()).passed


def test_a_failure_names_the_bound_as_set():
    """0.15 used to print as 1e-01, making 1.66e-01 > 1e-01 look like the wrong preset."""
    ref = {"last_hidden_state": torch.ones(2, 8, 16)}
    report = compare_outputs(
        ref, {"last_hidden_state": ref["last_hidden_state"] * 1.2}, Tolerance.int8()
    )
    assert report.failures == ["last_hidden_state: relative diff 2.00e-01 > 0.15"]


def test_argmax_disagreement_on_logits_fails():
    logits = torch.tensor([[1.0, 0.9], [0.2, 0.3]])
    flipped = torch.tensor([[0.9, 1.0], [0.2, 0.3]])
    report = compare_outputs(
        {"logits": logits},
        {"logits": flipped},
        Tolerance(max_rel=1.0, min_cosine=-1, min_argmax=1.0),
    )
    assert report.min_argmax == 0.5
    assert any("argmax" in f for f in report.failures)


def test_missing_output_shape_mismatch_and_nan_fail():
    ref = {"a": torch.ones(2), "b": torch.ones(3), "c": torch.ones(2)}
    got = {"a": torch.ones(2), "b": torch.ones(4), "c": torch.tensor([1.0, float("nan")])}
    failures = " ".join(compare_outputs(ref, got, Tolerance.int8()).failures)
    assert "'b'" not in failures and "b: shape" in failures
    assert "c: non-finite" in failures
    report = compare_outputs({"x": torch.ones(2)}, {}, Tolerance.strict())
    assert report.failures == ["output 'x' missing"]


def test_kv_cache_is_not_compared():
    ref = {"logits": torch.ones(1, 2, 5), "past_key_values": ((torch.ones(1),),)}
    assert compare_outputs(ref, {"logits": torch.ones(1, 2, 5)}, Tolerance.strict()).passed


def test_padding_positions_are_not_compared():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    ref = {"logits": torch.randn(2, 3, 5), "pooled": torch.randn(2, 4)}
    got = {"logits": ref["logits"].clone(), "pooled": ref["pooled"].clone()}
    got["logits"][0, 2] += 10.0  # garbage at a padded position
    assert compare_outputs(ref, got, Tolerance.strict(), mask).passed
    assert not compare_outputs(ref, got, Tolerance.strict()).passed
    got["logits"][1, 2] += 1.0  # a real token
    assert not compare_outputs(ref, got, Tolerance.strict(), mask).passed
