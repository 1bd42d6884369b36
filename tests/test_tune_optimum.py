"""tune() with the ONNX Runtime and OpenVINO backends: pipelines, cache hits, kept exports."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import tiny_inputs, tiny_model, write_tokenizer

import autocpu
from autocpu.accuracy import Tolerance, compare_outputs
from autocpu.backends import get_backend
from autocpu.hardware import probe


def engine(name: str):
    """An engine parameter, skipped where its backend cannot run (e.g. the legacy lane)."""
    available = get_backend(name).availability(None, probe())
    return pytest.param(name, marks=pytest.mark.skipif(not available.ok, reason=available.reason))


ENGINES = [engine("onnxruntime"), engine("openvino")]


def artifact_files(cache_dir, engine):
    prefix = "onnx" if engine == "onnxruntime" else "openvino"
    return sorted(p for p in cache_dir.glob(f"artifacts/*/{prefix}-*/*/*/*") if p.is_file())


@pytest.mark.parametrize("engine", ENGINES)
def test_tuned_engine_model_works_in_a_pipeline(engine, tmp_path, cache_dir):
    from transformers import pipeline

    tokenizer = write_tokenizer(tmp_path / "tok")
    model = tiny_model("bert", "AutoModelForSequenceClassification")
    inputs = dict(
        tokenizer(["the model runs fast", "a good plan"], padding=True, return_tensors="pt")
    )
    tuned = autocpu.tune(model, inputs, n_trials=2, backends=[engine], isolation="none")
    trials = [t for t in tuned.plan.trials if t.backend == engine]
    assert trials and trials[0].status == "ok", trials
    texts = ["the model runs fast on cpu", "bad cache", "a tuned plan"]
    expected = pipeline("text-classification", model=model, tokenizer=tokenizer)(texts)
    # Use the engine runner even if the baseline won this tiny race.
    engine_model = autocpu.apply_plan(model, _plan_for(tuned.plan, engine, trials[0]), inputs)
    got = pipeline("text-classification", model=engine_model, tokenizer=tokenizer)(texts)
    assert [g["label"] for g in got] == [e["label"] for e in expected]
    for g, e in zip(got, expected, strict=True):
        assert g["score"] == pytest.approx(e["score"], abs=1e-4)


def _plan_for(plan, engine, trial):
    import dataclasses

    return dataclasses.replace(plan, backend=engine, params=trial.params)


@pytest.mark.parametrize("engine", ENGINES)
def test_exports_are_kept_and_a_cache_hit_exports_nothing(engine, cache_dir):
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    first = autocpu.tune(model, inputs, n_trials=1, backends=[engine], isolation="none")
    files = artifact_files(cache_dir, engine)
    assert files, "the export is kept in the cache"
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files}
    forced = _plan_for(first.plan, engine, first.plan.trials[1])
    reloaded = autocpu.apply_plan(model, forced, inputs)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files} == stamps
    with torch.inference_mode():
        ref = model(**inputs)
    assert compare_outputs(
        ref, reloaded(**inputs), Tolerance.strict(), inputs["attention_mask"]
    ).passed
    shutil.rmtree(cache_dir / "artifacts")  # deleting the kept files means rebuild, not fail
    rebuilt = autocpu.apply_plan(model, forced, inputs)
    assert artifact_files(cache_dir, engine)
    assert compare_outputs(
        ref, rebuilt(**inputs), Tolerance.strict(), inputs["attention_mask"]
    ).passed


@pytest.mark.skipif(
    not get_backend("onnxruntime").availability(None, probe()).ok, reason="no ONNX Runtime"
)
def test_model_loaded_from_a_folder_then_changed_in_memory_is_exported_as_it_is(
    tmp_path, cache_dir
):
    folder = tmp_path / "saved"
    tiny_model("bert", "AutoModelForSequenceClassification").save_pretrained(folder)
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(-3.0)  # e.g. a head trained in this process
    inputs = tiny_inputs("bert")
    tuned = autocpu.tune(model, inputs, n_trials=1, backends=["onnxruntime"])
    assert tuned.plan.trials[1].status == "ok", tuned.plan.trials[1].reason


def test_without_optional_engines_import_probe_and_tune_still_work():
    """With only torch and transformers (the engines' packages made to vanish)."""
    script = os.path.join(os.path.dirname(__file__), "only_torch_run.py")
    env = {**os.environ, "COLUMNS": "200"}  # no line wrapping inside the install command
    out = subprocess.run(
        [sys.executable, script], capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pip install 'autocpu[onnxruntime]'" in out.stdout
    assert "pip install 'autocpu[openvino]'" in out.stdout
    assert (
        "SKIPPED ['bettertransformer', 'ipex', 'llama_cpp', 'onnxruntime', 'openvino']"
        in out.stdout
    )
    assert "LOADED []" in out.stdout
