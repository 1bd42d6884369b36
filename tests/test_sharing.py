"""Plans that travel: export/import bundles, the shipped tuning database, and bench."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from conftest import tiny_inputs, tiny_model

import autocpu
from autocpu.accuracy import Tolerance, compare_outputs
from autocpu.bench import bench
from autocpu.canary import check_canary
from autocpu.errors import AutocpuError
from autocpu.plans import PlanCache
from autocpu.sharing import export_bundle, import_bundle
from autocpu.workloads import ForwardPass

FAST = ["eager", "torchscript"]


def tune_here(*args, **kwargs):
    return autocpu.tune(*args, isolation="none", **kwargs)


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_export_then_import_on_another_cache_reuses_the_plan(tmp_path, cache_dir, umask_022):
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    tuned = tune_here(model, inputs, n_trials=3, backends=FAST)
    bundle = tmp_path / "plans.json"
    assert [p.key for p in export_bundle(PlanCache(), [], bundle)] == [tuned.plan.key]
    other = PlanCache(tmp_path / "other-machine-cache")
    assert [p.key for p in import_bundle(other, bundle)] == [tuned.plan.key]
    assert other.canary_path(tuned.plan.key).exists()  # it keeps checking itself
    # Shared files are written as open() would (0o666 less the umask), not mkstemp's 0600.
    for written in (bundle, other.path(tuned.plan.key), other.canary_path(tuned.plan.key)):
        assert stat.S_IMODE(written.stat().st_mode) == 0o644, written
    calls = []
    again = tune_here(
        model, inputs, n_trials=3, backends=FAST, cache_dir=other.root, progress=calls.append
    )
    assert again.from_cache and calls == []
    with pytest.raises(AutocpuError, match="cannot read plan bundle"):
        import_bundle(other, tmp_path / "missing.json")


def test_tuning_db_exact_match_is_used_and_family_match_seeds(tmp_path, cache_dir, monkeypatch):
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    shipped = tune_here(model, inputs, n_trials=3, backends=FAST)
    db = tmp_path / "tuning_db"
    db.mkdir()
    export_bundle(PlanCache(), [], db / "tiny-bert.json")
    monkeypatch.setenv("AUTOCPU_TUNING_DB", str(db))
    fresh_cache = tmp_path / "fresh-cache"
    calls = []
    used = tune_here(
        model, inputs, n_trials=3, backends=FAST, cache_dir=fresh_cache, progress=calls.append
    )
    assert used.source == "tuning_db" and calls == []
    assert used.plan.key == shipped.plan.key
    assert compare_outputs(model(**inputs), used(**inputs), Tolerance.strict()).passed
    # Other input shapes: no exact match, but the shipped winner is tried first.
    other_inputs = tiny_inputs("bert", seq=12)
    seeded = tune_here(
        model, other_inputs, n_trials=3, backends=FAST, cache_dir=fresh_cache, progress=calls.append
    )
    assert seeded.source == "search"
    first = next(e.record for e in calls if e.started)
    assert (first.backend, first.params) == (shipped.plan.backend, shipped.plan.params)


def test_a_shipped_plan_without_its_canary_is_used_and_makes_one(tmp_path, cache_dir, monkeypatch):
    """GPT-2's plans ship without their canaries (24-49 MiB of logits): the first use makes
    the canary from the model as given, instead of re-tuning."""
    model, inputs = tiny_model("gpt2", head="AutoModelForCausalLM"), tiny_inputs("gpt2")
    shipped = tune_here(model, inputs, n_trials=3, backends=FAST, workload="forward")
    db = tmp_path / "tuning_db"
    db.mkdir()
    export_bundle(PlanCache(), [], db / "tiny-gpt2.json")
    bundle = json.loads((db / "tiny-gpt2.json").read_text())
    bundle["plans"][0]["canary"] = None
    (db / "tiny-gpt2.json").write_text(json.dumps(bundle))
    monkeypatch.setenv("AUTOCPU_TUNING_DB", str(db))
    fresh = PlanCache(tmp_path / "fresh-cache")
    calls = []
    used = tune_here(
        model,
        inputs,
        n_trials=3,
        backends=FAST,
        cache_dir=fresh.root,
        progress=calls.append,
        workload="forward",
    )
    assert used.source == "tuning_db" and calls == []
    made = fresh.canary_path(shipped.plan.key)
    assert check_canary(made, used, Tolerance.strict()).passed
    with torch.inference_mode():
        reference = model(**ForwardPass([inputs]).probe().batches[0]).logits
    assert torch.equal(torch.load(made)["outputs"]["logits"], reference)


def test_bench_measures_the_plan_side_by_side(cache_dir):
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    tuned = tune_here(model, inputs, n_trials=3, backends=FAST)
    result = bench(model, inputs, tuned.plan, seconds=1.0)
    assert result.comparison.rounds >= 15
    assert result.accuracy.passed and result.build_s > 0
    assert set(result.comparison.stats) == {"baseline", "tuned"}
    text = result.summary()
    assert "speedup" in text and "outputs within tolerance" in text
