"""tune() end to end on tiny models: real searches, real outputs, real cache files."""

from __future__ import annotations

import importlib.metadata
import json

import pytest
import torch
from conftest import tiny_inputs, tiny_model, write_tokenizer

import autocpu
from autocpu.accuracy import Tolerance, compare_outputs
from autocpu.plans import PlanCache

FAST = ["eager", "torchscript"]


def tune_here(*args, **kwargs):
    """In-process trials: these tests are about tune()'s results, not about isolation."""
    return autocpu.tune(*args, isolation="none", **kwargs)


def counting_progress():
    calls = []
    return calls, lambda event: calls.append(event)


def test_tune_returns_a_drop_in_model_and_a_complete_plan(cache_dir):
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    calls, progress = counting_progress()
    tuned = tune_here(model, inputs, n_trials=6, backends=FAST, progress=progress)
    assert calls, "the search ran trials"
    starts = [e for e in calls if e.started]
    ends = [e for e in calls if not e.started]
    assert len(starts) == len(ends) and [e.finished for e in ends] == list(range(1, len(ends) + 1))
    assert ends[-1].total == 6 and ends[-1].best_speedup >= 1.0 and ends[-1].failures == 0
    with torch.inference_mode():
        ref = model(**inputs)
    out = tuned(**inputs)
    assert type(out) is type(ref)
    assert compare_outputs(ref, out, Tolerance.strict()).passed
    plan = tuned.plan
    assert plan.backend in FAST and not tuned.from_cache
    assert plan.machine["fingerprint"] == autocpu.probe().fingerprint()
    assert plan.model["architecture"] == "BertModel" and len(plan.model["weights"]) == 32
    assert plan.inputs[0]["input_ids"] == {"shape": [2, 16], "dtype": "int64"}
    assert {"autocpu", "torch", "transformers", "python"} <= set(plan.versions)
    assert plan.baseline.median_ms > 0 and plan.winner.median_ms > 0
    assert plan.speedup_iqr[0] <= plan.speedup <= plan.speedup_iqr[1]
    assert plan.accuracy.passed is True
    assert plan.tolerance["name"] == "strict"
    assert plan.decision
    statuses = {t.status for t in plan.trials}
    assert statuses <= {"ok", "inaccurate"}, [t.reason for t in plan.trials]
    assert sum(t.status == "ok" for t in plan.trials) >= 3  # baseline + both backends' defaults
    saved = json.loads((cache_dir / "plans" / f"{plan.key}.json").read_text())
    assert saved["backend"] == plan.backend
    table = tuned.explain()
    first_row = next(line for line in table.splitlines() if line.startswith("│"))
    assert first_row.startswith(f"│ {plan.backend} ") and "WINNER: " in first_row
    assert table.count("WINNER") == 1


def test_cached_plan_is_reused_without_a_trial(cache_dir):
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    first = tune_here(model, inputs, n_trials=4, backends=FAST)
    calls, progress = counting_progress()
    second = tune_here(model, inputs, n_trials=4, backends=FAST, progress=progress)
    assert second.from_cache and calls == []
    assert second.plan.key == first.plan.key
    assert compare_outputs(first(**inputs), second(**inputs), Tolerance.strict()).passed
    # Other inputs shapes, weights or tolerance are other plans.
    other = tune_here(model, tiny_inputs("bert", seq=12), n_trials=2, backends=["eager"])
    assert other.plan.key != first.plan.key and not other.from_cache


def test_strict_tolerance_never_tries_lossy_precision_and_a_loose_one_does(cache_dir):
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    tuned = tune_here(model, inputs, n_trials=10, backends=["eager"], cache=False)
    assert {t.params.get("precision", "fp32") for t in tuned.plan.trials} == {"fp32"}
    assert not (cache_dir / "plans").exists()  # cache=False writes nothing
    tight = {"max_rel": 1e-3, "min_cosine": 0.9999}  # admits lossy candidates, which then fail
    tuned = tune_here(model, inputs, n_trials=10, backends=["eager"], cache=False, tolerance=tight)
    lossy = [t for t in tuned.plan.trials if t.params.get("precision", "fp32") != "fp32"]
    assert lossy and all(t.status == "inaccurate" for t in lossy)


def test_list_of_batches_of_different_shapes(cache_dir):
    model = tiny_model("distilbert", "AutoModelForSequenceClassification")
    batches = [tiny_inputs("distilbert", batch=1, seq=8), tiny_inputs("distilbert", seq=20)]
    tuned = tune_here(model, batches, n_trials=4, backends=FAST)
    assert len(tuned.plan.inputs) == 2
    for batch in [*batches, tiny_inputs("distilbert", batch=3, seq=11)]:
        with torch.inference_mode():
            assert compare_outputs(model(**batch), tuned(**batch), Tolerance.strict()).passed


def test_gpt2_causal_lm_tunes_and_still_generates(cache_dir):
    model, inputs = tiny_model("gpt2", "AutoModelForCausalLM"), tiny_inputs("gpt2", batch=1)
    tuned = tune_here(model, inputs, n_trials=6, backends=FAST, workload="forward")
    with torch.inference_mode():
        ref = model(**inputs)
    assert compare_outputs(ref, tuned(**inputs), Tolerance.strict()).passed
    generated = tuned.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, model.generate(**inputs, max_new_tokens=3, do_sample=False))
    # A GPT-2 trace bakes the length in: whatever won must have survived the second length.
    shorter = {k: v[:, :8] for k, v in inputs.items()}
    with torch.inference_mode():
        assert compare_outputs(model(**shorter), tuned(**shorter), Tolerance.strict()).passed


def test_tuned_model_works_in_a_pipeline(tmp_path, cache_dir):
    from transformers import pipeline

    tokenizer = write_tokenizer(tmp_path / "tok")
    model = tiny_model("bert", "AutoModelForSequenceClassification")
    inputs = dict(
        tokenizer(["the model runs fast", "a good plan"], padding=True, return_tensors="pt")
    )
    tuned = tune_here(model, inputs, n_trials=4, backends=FAST)
    texts = ["the model runs fast on cpu", "bad cache", "a tuned plan"]
    expected = pipeline("text-classification", model=model, tokenizer=tokenizer)(texts)
    got = pipeline("text-classification", model=tuned, tokenizer=tokenizer)(texts)
    assert [g["label"] for g in got] == [e["label"] for e in expected]
    assert got[0]["score"] == pytest.approx(expected[0]["score"], abs=1e-5)


def test_apply_plan_to_a_fresh_model_without_searching(cache_dir):
    inputs = tiny_inputs("bert")
    tuned = tune_here(tiny_model("bert"), inputs, n_trials=4, backends=FAST)
    fresh = tiny_model("bert")  # same seed: same weights
    applied = autocpu.apply_plan(fresh, tuned.plan.key[:8])
    assert applied.plan.key == tuned.plan.key
    assert compare_outputs(fresh(**inputs), applied(**inputs), Tolerance.strict()).passed
    path = PlanCache().path(tuned.plan.key)
    assert autocpu.apply_plan(fresh, path, inputs).plan.backend == tuned.plan.backend
    with pytest.warns(autocpu.AutocpuWarning, match="other weights"):
        autocpu.apply_plan(tiny_model("bert", seed=1), path)


def test_a_crashing_backend_is_recorded_and_the_search_goes_on(cache_dir, monkeypatch):
    from autocpu.backends.torchscript import TorchScriptBackend

    def explode(self, spec, params, ctx):
        raise RuntimeError("native crash stand-in")

    monkeypatch.setattr(TorchScriptBackend, "build", explode)
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    tuned = tune_here(model, inputs, n_trials=4, backends=FAST)
    failed = [t for t in tuned.plan.trials if t.status == "failed"]
    assert failed and all("native crash stand-in" in t.reason for t in failed)
    assert tuned.plan.backend == "eager"


def test_a_plan_whose_outputs_drifted_is_stale_and_retuned(cache_dir):
    from autocpu.canary import check_canary

    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    first = tune_here(model, inputs, n_trials=3, backends=FAST)
    canary = PlanCache().canary_path(first.plan.key)
    assert check_canary(canary, first, Tolerance.strict()).passed
    kept = torch.load(canary, weights_only=True)
    kept["outputs"]["last_hidden_state"] += 0.5  # as if this machine now computed otherwise
    torch.save(kept, canary)
    with pytest.warns(autocpu.AutocpuWarning, match="stale: its canary failed"):
        again = tune_here(model, inputs, n_trials=3, backends=FAST)
    assert not again.from_cache
    assert tune_here(model, inputs, n_trials=3, backends=FAST).from_cache  # fresh canary


class Payload:
    def __reduce__(self):
        return (print, ("a pickled payload ran",))


@pytest.mark.parametrize(
    "content",
    [b"\x00 not a torch file", "payload", "list"],
    ids=["garbage", "pickled-object", "wrong-structure"],
)
def test_an_unreadable_canary_fails_its_check_instead_of_raising(content, tmp_path):
    import io
    import pickle

    from autocpu.canary import check_canary

    path = tmp_path / "plan.canary.pt"
    if content == "payload":
        path.write_bytes(pickle.dumps({"inputs": Payload(), "outputs": {}}))
    elif content == "list":
        buffer = io.BytesIO()
        torch.save([1, 2, 3], buffer)
        path.write_bytes(buffer.getvalue())
    else:
        path.write_bytes(content)
    report = check_canary(path, tiny_model("bert"), Tolerance.strict())
    assert not report.passed and report.failures[0].startswith("canary unreadable (")


def test_a_loose_tolerance_tries_the_usual_lossy_recipes_first(cache_dir):
    """Before any backend's fp32 defaults: a tight time budget must still reach them."""
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    calls = []
    tune_here(
        model,
        inputs,
        n_trials=3,
        backends=["eager", "torchscript"],
        cache=False,
        tolerance="int8",
        progress=calls.append,
    )
    tried = [(e.record.backend, e.record.params.get("precision")) for e in calls if e.started]
    recipes = ["bf16_weights", "int8_dynamic"] if autocpu.probe().native_bf16 else ["int8_dynamic"]
    then = [("eager", "fp32"), ("torchscript", None)]
    assert tried == [*(("eager", precision) for precision in recipes), *then][:3]


def test_exhaustive_search_measures_every_point_of_the_space_once(cache_dir):
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    threads = autocpu.probe().usable_cpus
    tuned = tune_here(model, inputs, backends=["torchscript"], search="exhaustive")
    plan = tuned.plan
    # freeze+optimize, freeze alone, neither; each at every thread count from 1 to usable_cpus
    assert plan.study_trials == 3 * threads and plan.search == "exhaustive"
    measured = {
        (t.params["freeze"], t.params["optimize"], t.params["threads"])
        for t in plan.trials
        if t.backend == "torchscript"
    }
    combos = [(True, True), (True, False), (False, False)]
    assert measured == {(f, o, n) for f, o in combos for n in range(1, threads + 1)}
    sampled = tune_here(model, inputs, backends=["torchscript"], n_trials=2)
    assert sampled.plan.key != plan.key and not sampled.from_cache, "its own key, not TPE's"


def test_the_budget_counts_distinct_candidates_and_stops_when_the_space_runs_out(cache_dir):
    """TPE re-proposes measured points (cheap, but they used to eat the budget); a repeat now
    queues an unmeasured point instead, and a space smaller than the budget is measured whole."""
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    threads = autocpu.probe().usable_cpus

    def points(plan):
        return [
            (t.backend, json.dumps(t.params, sort_keys=True))
            for t in plan.trials
            if t.reason != "baseline"
        ]

    budget = 3 * threads + 1  # torchscript's space (3 x threads) plus eager's (2 x threads)
    mixed = tune_here(model, inputs, n_trials=budget, backends=FAST, cache=False).plan
    assert mixed.study_trials == budget and len(set(points(mixed))) == budget
    small = tune_here(model, inputs, n_trials=50, backends=["torchscript"], cache=False).plan
    assert small.study_trials == 3 * threads  # stopped: nothing left to measure
    assert sorted(points(small)) == sorted(set(points(small))) and len(points(small)) == 3 * threads


def test_unknown_search_strategy_is_refused_in_one_line():
    with pytest.raises(autocpu.AutocpuError, match="search='grid' is not known"):
        tune_here(tiny_model("bert"), tiny_inputs("bert"), search="grid")


def test_a_source_checkout_without_package_metadata_records_its_version(monkeypatch):
    """Run from a source tree on PYTHONPATH (no dist-info), autocpu still records the version
    it is, so such plans are checked like any other instead of reading "not installed"."""
    from autocpu.plans import package_versions

    def no_metadata(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", no_metadata)
    versions = package_versions(["autocpu", "torch", "surely-not-a-package"])
    assert versions == {
        "autocpu": autocpu.__version__,
        "torch": torch.__version__,
        "surely-not-a-package": "not installed",
    }
