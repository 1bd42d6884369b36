"""The benchmark suite end to end on a tiny model: real tunes, real by-hand columns, real
interleaved measurement, and the files it commits (JSON, markdown, PNG, tuning database)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

import autocpu
from autocpu.inputs import synthesize_inputs
from autocpu.models import load_model_dir
from autocpu.plans import PlanCache
from autocpu.sharing import read_bundle

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import protocol_check, render, run_suite  # noqa: E402
from benchmarks.by_hand import BY_HAND  # noqa: E402

pytest.importorskip("optimum.onnxruntime")
pytest.importorskip("optimum.intel.openvino")


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    work = tmp_path_factory.mktemp("suite")
    argv = ["--models", "tiny-bert", "--shapes", "b1s16", "--tolerances", "strict"]
    argv += ["--oracle", "none", "--trials", "4", "--seconds", "2", "--work", str(work)]
    argv += ["--results", str(work / "results"), "--export-tuning-db", str(work / "db")]
    assert run_suite.main(argv) == 0
    fingerprint = autocpu.probe().fingerprint()
    results = json.loads((work / "results" / f"{fingerprint}.json").read_text())
    return results, work


def test_every_column_is_measured_against_fp32_eager_in_one_run(suite):
    """Each column in a warm process of its own (tests/test_benchmark_workers.py checks that)."""
    results, _ = suite
    run = results["runs"]["tiny-bert/b1s16"]
    columns = run["columns"]
    assert set(columns) == {*BY_HAND, "autocpu_strict"}
    assert columns["eager"]["speedup"] == 1.0 and columns["eager"]["max_abs"] == 0.0
    for name, column in columns.items():
        if column["error"]:
            continue
        assert column["median_ms"] > 0 and column["speedup"] > 0, name
        assert column["gflops"] > 0 and column["fraction_of_peak"] > 0, name
    assert columns["ort"]["strict_ok"] and columns["openvino_f32"]["strict_ok"]
    expected = "bf16" if autocpu.probe().native_bf16 else "fp32"
    assert columns["openvino"]["precision"] == expected  # OpenVINO's own default, read back
    assert run["gflop_per_call"] > 0 and run["rounds"] >= run_suite.MIN_ROUNDS
    assert run["protocol"] == render.APART
    assert set(results["gemm_peaks"]) >= {"fp32", "int8"}


def test_the_strict_plan_is_accurate_reloaded_and_costed(suite):
    results, _ = suite
    plan = results["runs"]["tiny-bert/b1s16"]["columns"]["autocpu_strict"]
    assert plan["strict_ok"] and plan["from_cache"] and plan["study_trials"] >= 4
    assert 0 < plan["reload_s"] < plan["tune_s"]
    assert plan["tune_peak_rss_mb"] > 100 and plan["serving_rss_mb"] > 100
    assert plan["serving_rss_mb"] <= plan["process_peak_rss_mb"]


def test_serving_memory_leaves_out_what_loading_held_and_freed(monkeypatch):
    from benchmarks import child

    monkeypatch.setattr(child, "SERVE_SECONDS", 0.2)
    transient = torch.ones(64 << 20)  # 256 MiB touched and freed, as a load's copies are
    del transient
    memory = child.serve(torch.nn.Linear(8, 8), {"input": torch.ones(1, 8)})
    assert memory["process_peak_rss_mb"] - memory["serving_rss_mb"] > 200


def test_a_child_reports_its_own_peak_not_the_rss_it_was_forked_with():
    held = torch.ones(256 << 20)  # 1 GiB in this process while the child starts
    assert psutil.Process().memory_info().rss > 1100 * 2**20
    code = "from benchmarks.child import own_peak_rss_mb; print(own_peak_rss_mb())"
    child = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    del held
    assert 50 < float(child.stdout) < 1024  # torch imported, not this process's gigabyte


def test_markdown_and_chart_are_written_from_the_json(suite):
    results, work = suite
    stem = work / "results" / results["machine"]["fingerprint"]
    text = stem.with_suffix(".md").read_text()
    assert "Speedup over fp32 eager" in text and "| tiny-bert/b1s16 |" in text
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    column = results["runs"]["tiny-bert/b1s16"]["columns"]["autocpu_strict"]
    row = render.summary(results, "b1s16").splitlines()[2]
    assert row.startswith("| tiny-bert | ") and f"{column['speedup']:.2f}x" in row
    assert row.endswith("| not run |")  # no oracle in this run


def test_the_exported_tuning_db_answers_a_tune_without_searching(suite, tmp_path, monkeypatch):
    results, work = suite
    bundle = work / "db" / f"{results['machine']['fingerprint']}.json"
    key = results["runs"]["tiny-bert/b1s16"]["columns"]["autocpu_strict"]["key"]
    assert [shared.plan.key for shared in read_bundle(bundle)] == [key]
    monkeypatch.setenv("AUTOCPU_TUNING_DB", str(bundle.parent))
    model_dir = work / "models" / "tiny-bert"
    model = load_model_dir(model_dir, "feature-extraction")
    batch = synthesize_inputs(model, 1, 16, str(model_dir))
    tuned = autocpu.tune(model, batch, cache_dir=tmp_path / "fresh-cache")
    assert tuned.source == "tuning_db" and tuned.plan.key == key


def test_export_only_writes_the_tuning_db_and_measures_nothing(suite, tmp_path):
    results, work = suite
    fingerprint = results["machine"]["fingerprint"]
    before = (work / "results" / f"{fingerprint}.json").read_text()
    argv = ["--export-only", "--work", str(work), "--results", str(work / "results")]
    assert run_suite.main([*argv, "--export-tuning-db", str(tmp_path)]) == 0
    key = results["runs"]["tiny-bert/b1s16"]["columns"]["autocpu_strict"]["key"]
    assert [shared.plan.key for shared in read_bundle(tmp_path / f"{fingerprint}.json")] == [key]
    assert (work / "results" / f"{fingerprint}.json").read_text() == before


def test_the_tuning_db_ships_plans_without_canaries(suite):
    """The row's cache holds the plan's canary; the shipped bundle does not (tune() makes one
    from the user's model on first use)."""
    results, work = suite
    run = results["runs"]["tiny-bert/b1s16"]
    key = run["columns"]["autocpu_strict"]["key"]
    assert PlanCache(run_suite.row_cache(work, "tiny-bert", "b1s16")).canary_path(key).exists()
    shipped = read_bundle(work / "db" / f"{results['machine']['fingerprint']}.json")
    assert [(entry.plan.key, entry.canary) for entry in shipped] == [(key, None)]


def test_an_oracle_asked_for_a_finished_row_reuses_its_shipped_plans(suite, tmp_path, monkeypatch):
    """The row's work folder is gone (a new session): its plans come back from the tuning
    database, the oracle sweeps, the row is measured again, and the tunes' costs are kept."""
    results, work = suite
    fingerprint = results["machine"]["fingerprint"]
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / f"{fingerprint}.json").write_text(json.dumps(results))
    monkeypatch.setenv("AUTOCPU_TUNING_DB", str(work / "db"))
    argv = ["--models", "tiny-bert", "--shapes", "b1s16", "--tolerances", "strict"]
    argv += ["--oracle", "tiny-bert/b1s16", "--seconds", "1", "--work", str(tmp_path / "work")]
    assert run_suite.main([*argv, "--results", str(tmp_path / "results")]) == 0
    again = json.loads((tmp_path / "results" / f"{fingerprint}.json").read_text())
    before = results["runs"]["tiny-bert/b1s16"]
    run = again["runs"]["tiny-bert/b1s16"]
    plan, earlier_plan = run["columns"]["autocpu_strict"], before["columns"]["autocpu_strict"]
    assert plan["key"] == earlier_plan["key"] and plan["tune_from_cache"]
    for kept in ("tune_s", "tune_peak_rss_mb", "study_trials"):
        assert plan[kept] == earlier_plan[kept], kept
    assert run["plans_tuned"] == before["measured"] and run["measured"] != before["measured"]
    oracle = run["columns"]["oracle_strict"]
    assert oracle["speedup"] > 0 and oracle["strict_ok"] and oracle["study_trials"] > 4
    assert not oracle["tune_from_cache"]
    row = render.summary(again, "b1s16").splitlines()[2]
    assert not row.endswith("| not run |")


def test_remeasure_measures_a_finished_row_again_without_searching(suite):
    _, work = suite
    path = work / "results" / f"{autocpu.probe().fingerprint()}.json"
    before = json.loads(path.read_text())["runs"]["tiny-bert/b1s16"]
    argv = ["--models", "tiny-bert", "--shapes", "b1s16", "--tolerances", "strict"]
    argv += ["--remeasure", "--oracle", "none", "--seconds", "1", "--work", str(work)]
    assert run_suite.main([*argv, "--results", str(work / "results")]) == 0
    run = json.loads(path.read_text())["runs"]["tiny-bert/b1s16"]
    plan, earlier_plan = run["columns"]["autocpu_strict"], before["columns"]["autocpu_strict"]
    assert run["measured"] != before["measured"] and plan["median_ms"] > 0
    assert plan["key"] == earlier_plan["key"] and plan["tune_from_cache"]
    for kept in ("tune_s", "study_trials"):
        assert plan[kept] == earlier_plan[kept], kept


def test_force_re_tunes_a_finished_row_instead_of_reloading_its_plans(suite):
    results, work = suite
    key = results["runs"]["tiny-bert/b1s16"]["columns"]["autocpu_strict"]["key"]
    cache = PlanCache(run_suite.row_cache(work, "tiny-bert", "b1s16"))
    first = cache.load(key).created
    argv = ["--models", "tiny-bert", "--shapes", "b1s16", "--tolerances", "strict", "--force"]
    argv += ["--oracle", "none", "--trials", "2", "--seconds", "1", "--work", str(work)]
    assert run_suite.main([*argv, "--results", str(work / "results")]) == 0
    again = json.loads((work / "results" / f"{autocpu.probe().fingerprint()}.json").read_text())
    plan = again["runs"]["tiny-bert/b1s16"]["columns"]["autocpu_strict"]
    assert plan["study_trials"] == 2  # a new search with the new budget, not the cached one
    assert cache.load(plan["key"]).created != first


def test_the_protocol_check_compares_the_stored_speedup_with_separate_processes(tmp_path):
    argv = ["--models", "tiny-bert", "--repeats", "2", "--seconds", "0.5", "--trials", "3"]
    assert protocol_check.main([*argv, "--work", str(tmp_path), "--results", str(tmp_path)]) == 0
    fingerprint = autocpu.probe().fingerprint()
    results = json.loads((tmp_path / f"protocol-{fingerprint}.json").read_text())
    run = results["runs"]["tiny-bert/b1s128"]
    assert len(run["separate_ratios"]) == 2 and all(r > 0 for r in run["separate_ratios"])
    eager, plan = run["repeats"][0]["eager"], run["repeats"][0]["plan"]
    assert run["separate_ratios"][0] == pytest.approx(eager["median_ms"] / plan["median_ms"])
    assert eager["calls"] >= 10 and plan["calls"] >= 10
    assert run["stored_speedup"] > 0 and run["plan"]["key"]
    assert run["quiet_ok"] == (abs(run["stored_speedup"] / run["separate_ratio"] - 1) <= 0.15)
    assert "tiny-bert b1s128" in (tmp_path / f"protocol-{fingerprint}.md").read_text()
