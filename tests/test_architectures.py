"""Every architecture and task autocpu supports, tuned as a user would: through the API (with
and without inputs) and the CLI (a save_pretrained folder, with and without a tokenizer).

Each asserts the class tuned, the task, and the outputs of every engine that passed: the same
output class as the original and every field the original returns.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from architectures import ARCHITECTURES, Architecture
from conftest import write_tokenizer

import autocpu
from autocpu.backends import get_backend
from autocpu.cli import main
from autocpu.hardware import probe
from autocpu.inputs import synthesize_inputs
from autocpu.models import load_model_dir
from autocpu.outputs import CACHE_FIELDS
from autocpu.records import OK

EXPORTERS = ("onnxruntime", "openvino")

#: Engines that cannot take an architecture, and the words their reason must contain.
NOT_EXPORTED = {
    ("BertForMultipleChoice", "openvino"): "no OVModelFor... class for 'multiple-choice'",
    ("T5EncoderModel", "onnxruntime"): "as T5Model, not as T5EncoderModel",
    ("T5EncoderModel", "openvino"): "as T5Model, not as T5EncoderModel",
    ("MT5EncoderModel", "onnxruntime"): "as MT5Model",
    ("MT5EncoderModel", "openvino"): "as MT5Model",
    ("T5ForConditionalGeneration", "openvino"): "OpenVINO export failed",
}

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _unavailable_exporters() -> list[str]:
    hw = probe()
    return [name for name in EXPORTERS if not get_backend(name).availability(None, hw).ok]


#: The legacy lane (torch 2.8, optimum 1.x) has neither exporter's runtime.
needs_exporters = pytest.mark.skipif(
    bool(_unavailable_exporters()), reason="needs onnxruntime and openvino (the 'all' extra)"
)


def _fields(output: Any) -> dict[str, torch.Tensor]:
    return {
        name: value
        for name, value in output.items()
        if isinstance(value, torch.Tensor) and name not in CACHE_FIELDS
    }


def assert_same_outputs(original: torch.nn.Module, tuned: Any, inputs: dict) -> None:
    """The tuned model's output is the original's class and holds every field it holds."""
    with torch.inference_mode():
        expected, got = original(**inputs), tuned(**inputs)
    assert type(got) is type(expected)
    expected_fields, got_fields = _fields(expected), _fields(got)
    assert sorted(got_fields) == sorted(expected_fields)
    for name, value in expected_fields.items():
        torch.testing.assert_close(got_fields[name], value, rtol=1e-4, atol=1e-4, msg=name)


def _forced(model: torch.nn.Module, plan: Any, trial: Any, inputs: dict) -> Any:
    """The plan with ``trial``'s engine as its winner, applied: each passing engine's outputs."""
    return autocpu.apply_plan(
        model, dataclasses.replace(plan, backend=trial.backend, params=trial.params), inputs
    )


@pytest.mark.slow
@needs_exporters
@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: a.id)
def test_api_with_inputs_tunes_the_class_on_every_engine(arch: Architecture) -> None:
    model = arch.build()
    inputs = synthesize_inputs(model, 2, 16)
    tuned = autocpu.tune(
        model, inputs, backends=list(EXPORTERS), n_trials=2, isolation="none", workload="forward"
    )
    assert type(tuned).__name__ == arch.model_class and tuned.model is model
    assert tuned.plan.task == arch.task
    assert_same_outputs(model, tuned, inputs)
    for name in EXPORTERS:
        trials = [t for t in tuned.plan.trials if t.backend == name]
        assert trials, name
        expected = NOT_EXPORTED.get((arch.id, name))
        if expected:
            assert all(t.status != OK and expected in t.reason for t in trials), trials
            continue
        assert all(t.status == OK for t in trials), [(t.status, t.reason) for t in trials]
        assert_same_outputs(model, _forced(model, tuned.plan, trials[0], inputs), inputs)


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: a.id)
def test_api_without_inputs_makes_inputs_of_the_model_kind(arch: Architecture) -> None:
    model = arch.build()
    with pytest.warns(autocpu.AutocpuWarning, match="made-up inputs"):
        tuned = autocpu.tune(
            model, backends=["eager"], n_trials=1, isolation="none", workload="forward"
        )
    assert tuned.plan.task == arch.task
    names = set(tuned.plan.inputs[0])
    assert model.main_input_name in names
    if arch.task == "text2text-generation":
        assert "decoder_input_ids" in names
    inputs = synthesize_inputs(model, 1, 8)
    assert_same_outputs(model, tuned, inputs)


CLI_CASES = [
    pytest.param(arch, tokenizer, id=f"{arch.id}-{'tokenizer' if tokenizer else 'config'}")
    for arch in ARCHITECTURES
    for tokenizer in ((True, False) if arch.text else (False,))
]


@pytest.mark.parametrize(("arch", "tokenizer"), CLI_CASES)
def test_cli_tunes_the_class_the_folder_holds(
    arch: Architecture, tokenizer: bool, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / arch.id
    model = arch.build()
    model.save_pretrained(folder)
    if tokenizer:
        write_tokenizer(folder)
    flags = ["--backends", "eager", "--trials", "1", "--isolation", "none", "--seq-len", "8"]
    assert main(["tune", str(folder), *flags, "--workload", "forward", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["model"]["architecture"] == arch.model_class
    assert plan["task"] == arch.task and plan["source"] == "search"
    assert model.main_input_name in plan["inputs"][0]
    loaded = load_model_dir(folder)
    assert type(loaded) is type(model)
    served = autocpu.apply_plan(loaded, plan["key"])
    assert_same_outputs(model, served, synthesize_inputs(model, 1, 8))


def test_cli_refuses_a_class_transformers_lacks(tmp_path: Path, capsys) -> None:
    arch = ARCHITECTURES[0]
    arch.build().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(
        json.dumps({**config, "architectures": ["BertForSomethingNew"]})
    )
    assert main(["tune", str(tmp_path), "--backends", "eager", "--trials", "1"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0
    assert "holds a BertForSomethingNew, which transformers" in error


@pytest.fixture(scope="module")
def ort_bert() -> tuple[torch.nn.Module, Any, dict]:
    """A BERT encoder and its tuned model on an ONNX Runtime plan (a graph of fixed outputs)."""
    model = next(a for a in ARCHITECTURES if a.id == "BertModel").build()
    inputs = synthesize_inputs(model, 2, 16)
    tuned = autocpu.tune(model, inputs, backends=["onnxruntime"], n_trials=1, isolation="none")
    trial = next(t for t in tuned.plan.trials if t.backend == "onnxruntime" and t.status == OK)
    return model, _forced(model, tuned.plan, trial, inputs), inputs


@needs_exporters
def test_an_exported_plan_serves_options_it_cannot_honour_with_the_original(ort_bert) -> None:
    model, tuned, inputs = ort_bert
    assert tuned.runner.fixed_outputs
    calls = []
    original_forward = model.forward
    model.forward = lambda *a, **k: (calls.append(sorted(k)), original_forward(*a, **k))[1]
    try:
        plain = tuned(**inputs)
        assert calls == [] and plain.hidden_states is None
        hidden = tuned(**inputs, output_hidden_states=True)
        assert len(calls) == 1 and len(hidden.hidden_states) == model.config.num_hidden_layers + 1
        as_tuple = tuned(**inputs, return_dict=False)
        assert len(calls) == 1 and isinstance(as_tuple, tuple)
        torch.testing.assert_close(as_tuple[0], plain.last_hidden_state)
    finally:
        model.forward = original_forward


@needs_exporters
def test_labels_give_the_loss_the_original_computes() -> None:
    classifier = ARCHITECTURES[0].build()
    inputs = synthesize_inputs(classifier, 2, 16)
    tuned = autocpu.tune(classifier, inputs, backends=["onnxruntime"], n_trials=1, isolation="none")
    trial = next(t for t in tuned.plan.trials if t.backend == "onnxruntime" and t.status == OK)
    engine = _forced(classifier, tuned.plan, trial, inputs)
    labels = torch.tensor([0, 1])
    with torch.inference_mode():
        expected = classifier(**inputs, labels=labels).loss
        got = engine(**inputs, labels=labels).loss
    assert got is not None
    torch.testing.assert_close(got, expected)


def test_explain_names_missing_outputs_instead_of_perfect_numbers() -> None:
    from autocpu.accuracy import Tolerance, compare_outputs
    from autocpu.report import accuracy_cell

    reference = {"last_hidden_state": torch.ones(1, 2, 3), "pooler_output": torch.ones(1, 3)}
    report = compare_outputs(reference, {"last_hidden_state": torch.ones(1, 2, 3)}, Tolerance())
    assert not report.passed and report.missing == ["pooler_output"]
    assert accuracy_cell(report) == "missing pooler_output"
    assert report.measured is None


SEQ2SEQ = [a for a in ARCHITECTURES if a.task == "text2text-generation"]


@pytest.mark.slow
@needs_exporters
@pytest.mark.parametrize("arch", SEQ2SEQ, ids=lambda a: a.id)
def test_encoder_decoders_are_tuned_on_generate_and_serve_it(arch: Architecture) -> None:
    model = arch.build()
    prompts = synthesize_inputs(model, 2, 12)
    prompts.pop("decoder_input_ids")
    prompts["attention_mask"][1, :4] = 0  # a padded prompt: masks must reach the encoder
    tuned = autocpu.tune(
        model, prompts, backends=list(EXPORTERS), max_new_tokens=4, n_trials=2, isolation="none"
    )
    assert tuned.plan.workload == "generate" and tuned.plan.winner_generation is not None
    expected = model.generate(**prompts, max_new_tokens=4, do_sample=False)
    for name in EXPORTERS:
        trials = [t for t in tuned.plan.trials if t.backend == name]
        if (arch.id, name) in NOT_EXPORTED:
            continue
        assert trials and all(t.status == OK for t in trials), [
            (t.status, t.reason) for t in trials
        ]
        assert all(t.accuracy.same_tokens == 1.0 for t in trials)
        engine = _forced(model, tuned.plan, trials[0], prompts)
        assert engine.runner.can_generate
        assert torch.equal(engine.generate(**prompts, max_new_tokens=4, do_sample=False), expected)
