"""Tiny models, their inputs and fp32 reference outputs, shared by the engine backend tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from conftest import tiny_inputs, tiny_model

from autocpu.accuracy import real_tokens
from autocpu.backends.base import Backend, BuildContext
from autocpu.hardware import probe
from autocpu.models import ModelSpec, make_spec
from autocpu.outputs import named_tensors

#: Case name -> (tiny config kind, Auto class).
MODELS = {
    "bert": ("bert", "AutoModel"),
    "bert-cls": ("bert", "AutoModelForSequenceClassification"),
    "gpt2": ("gpt2", "AutoModelForCausalLM"),
}


@dataclasses.dataclass
class Case:
    spec: ModelSpec
    inputs: dict[str, torch.Tensor]
    reference: dict[str, torch.Tensor]
    ctx: BuildContext


def make_cases(artifact_dir: Path) -> dict[str, Case]:
    """Each model with a padded batch (the second row ends in padding) and its outputs."""
    return {name: make_case(kind, head, artifact_dir) for name, (kind, head) in MODELS.items()}


def make_case(kind: str, head: str, artifact_dir: Path) -> Case:
    """A tiny model of ``kind`` with ``head``, a padded batch and its outputs."""
    model = tiny_model(kind, head)
    inputs = tiny_inputs(kind, batch=2, seq=12, seed=1)
    with torch.inference_mode():
        reference = named_tensors(model(**inputs))
    ctx = BuildContext(hw=probe(), example_inputs=[inputs], artifact_dir=artifact_dir)
    return Case(make_spec(model), inputs, reference, ctx)


def run(backend: Backend, case: Case, params: dict[str, Any]) -> dict[str, torch.Tensor]:
    runner = backend.bind(backend.build(case.spec, params, case.ctx), params)
    return named_tensors(runner(**case.inputs))


def _pair(outputs: dict, case: Case, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    mask = case.inputs["attention_mask"]
    return real_tokens(outputs[key], mask), real_tokens(case.reference[key], mask)


def max_diff(outputs: dict, case: Case, key: str) -> float:
    got, expected = _pair(outputs, case, key)
    return (got - expected).abs().max().item()


def cosine(outputs: dict, case: Case, key: str) -> float:
    got, expected = _pair(outputs, case, key)
    return float(torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0))


def generated_tokens(backend: Backend, case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens from the backend's KV-cached export and from torch, for the same prompt."""
    params = backend.defaults(probe())
    built = backend.build(case.spec, params, case.ctx)
    assert built.with_past
    model = backend.bind(built, params).fn
    prompt = case.inputs["input_ids"][:1]
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    expected = case.spec.model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs), expected


def reference(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
    with torch.inference_mode():
        return model(**inputs)


def assert_matches_at_two_lengths(runner: Any, model: torch.nn.Module, inputs: dict) -> None:
    """Same output type and strict accuracy at real tokens, at the example's length and at 8
    tokens (a candidate that baked in the example's shape fails the second)."""
    from autocpu.accuracy import Tolerance, compare_outputs
    from autocpu.inputs import at_sequence_length

    for batch in (inputs, at_sequence_length(inputs, 8)):
        out, ref = runner(**batch), reference(model, batch)
        assert type(out) is type(ref)
        report = compare_outputs(ref, out, Tolerance.strict(), batch["attention_mask"])
        assert report.passed, report.failures
