"""Hostile and unlucky inputs: bundles, cache files, shipped plans, folders and options that
once gave tracebacks or wrote where they should not. Each is one line, and nothing is lost."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from conftest import run_cli, tiny_inputs, tiny_model
from misbehaving_backends import BARRIER

import autocpu
from autocpu.errors import AutocpuError
from autocpu.plans import PlanCache
from autocpu.sharing import export_bundle, import_bundle


def quick_tune(**options):
    return autocpu.tune(
        tiny_model("bert"),
        tiny_inputs("bert"),
        n_trials=1,
        backends=["eager"],
        isolation="none",
        **options,
    )


@pytest.fixture
def bundle(cache_dir: Path, tmp_path: Path) -> dict:
    """A real exported bundle of one plan, as JSON to tamper with."""
    quick_tune()
    path = tmp_path / "bundle.json"
    export_bundle(PlanCache(), [], path)
    return json.loads(path.read_text())


def write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("key", ["../../escaped", "/tmp/autocpu-escaped", "ab" * 10 + "/.."])
def test_a_bundle_key_that_is_not_a_plan_key_is_refused_and_writes_nothing(bundle, key, tmp_path):
    bundle["plans"][0]["plan"]["key"] = key
    target = PlanCache(tmp_path / "other-cache")
    with pytest.raises(AutocpuError, match="is not a plan key") as raised:
        import_bundle(target, write(tmp_path / "hostile.json", bundle))
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "other-cache").exists()
    assert not list(Path("/tmp").glob("autocpu-escaped*"))
    assert not list(tmp_path.parent.glob("escaped*"))


def test_a_planted_symlink_does_not_lead_a_plan_write_outside_the_cache(bundle, tmp_path):
    key = bundle["plans"][0]["plan"]["key"]
    cache = PlanCache(tmp_path / "other-cache")
    cache.plans_dir.mkdir(parents=True)
    outside = tmp_path / "outside.json"
    outside.write_text("keep me")
    (cache.plans_dir / f"{key}.json").symlink_to(outside)
    with pytest.raises(ValueError, match="resolves outside"):
        import_bundle(cache, write(tmp_path / "bundle.json", bundle))
    assert outside.read_text() == "keep me"


@pytest.mark.parametrize(
    ("field", "value"),
    [("speedup", "fast"), ("machine", "x"), ("trials", ["x"]), ("baseline", {"median": 1})],
)
def test_a_plan_with_a_wrong_field_type_is_corrupt_moved_aside_and_said(field, value, cache_dir):
    tuned = quick_tune()
    path = PlanCache().path(tuned.plan.key)
    data = json.loads(path.read_text())
    data[field] = value
    write(path, data)
    listed = run_cli("plans", "list", cache=cache_dir)
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    (warning,) = listed.stderr.strip().splitlines()
    assert warning.startswith(f"autocpu: warning: corrupt plan {path} (ValueError: ")
    assert f"moved to {cache_dir / 'corrupt'}" in warning
    assert not path.exists() and len(list((cache_dir / "corrupt").glob("*.json"))) == 1
    assert quick_tune().source == "search"  # nothing cached now: a tune searches again


def test_a_bundle_whose_plan_has_a_wrong_type_is_refused(bundle, tmp_path):
    bundle["plans"][0]["plan"]["key"] = 5
    with pytest.raises(AutocpuError, match="cannot read plan bundle"):
        import_bundle(PlanCache(tmp_path / "other"), write(tmp_path / "b.json", bundle))


def test_a_truncated_plan_is_reported_by_plans_list_not_silently_dropped(cache_dir):
    path = PlanCache().path(quick_tune().plan.key)
    path.write_text(path.read_text()[:100])
    listed = run_cli("plans", "list", cache=cache_dir)
    assert listed.returncode == 0 and "no plans in" in listed.stdout
    assert "autocpu: warning: corrupt plan" in listed.stderr and "moved to" in listed.stderr


def test_a_corrupt_shipped_bundle_is_skipped_with_one_line_and_tuning_goes_on(
    tmp_path, monkeypatch, cache_dir
):
    shipped = tmp_path / "tuning_db"
    shipped.mkdir()
    (shipped / "broken.json").write_text("{not json")
    monkeypatch.setenv("AUTOCPU_TUNING_DB", str(shipped))
    with pytest.warns(autocpu.AutocpuWarning, match="shipped plans skipped") as caught:
        tuned = quick_tune()
    assert tuned.source == "search"
    assert any("AUTOCPU_TUNING_DB" in str(w.message) for w in caught)


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"n_trials": "5"}, "n_trials='5' is not a whole number"),
        ({"n_trials": True}, "n_trials=True"),
        ({"timeout": math.nan}, "timeout=nan is not a positive number"),
        ({"trial_timeout": math.inf}, "trial_timeout=inf"),
        ({"memory_limit_gb": "2"}, "memory_limit_gb='2'"),
        ({"task": "painting"}, "unknown task 'painting'"),
        ({"backends": "eager"}, "non-empty list"),
    ],
)
def test_options_of_the_wrong_type_are_one_line(options, needle):
    with pytest.raises(AutocpuError, match="--") as raised:
        autocpu.tune(tiny_model("bert"), tiny_inputs("bert"), **options)
    assert needle in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize("broken", ["no-weights", "bad-config"])
def test_a_model_folder_that_does_not_load_is_one_line_in_the_cli(broken, tmp_path, cache_dir):
    folder = tmp_path / "model"
    tiny_model("bert").save_pretrained(folder)
    if broken == "no-weights":
        for weights in folder.glob("*.safetensors"):
            weights.unlink()
    else:
        (folder / "config.json").write_text("{not json")
    result = run_cli("tune", str(folder), "--trials", "1", cache=cache_dir)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"autocpu: error: cannot load the model in {folder}")


@contextlib.contextmanager
def mounted(target: Path, *options: str) -> Iterator[None]:
    """A mount at ``target`` for the test (root only), unmounted after it."""
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", *options, str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here ({done.stderr.strip()[:80]})")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_a_read_only_cache_still_lists_and_a_tune_there_is_one_line(tmp_path):
    cache = tmp_path / "cache"
    key = quick_tune(cache_dir=cache).plan.key
    with mounted(cache, "--bind", str(cache)):
        subprocess.run(["mount", "-o", "remount,ro,bind", str(cache)], check=True)
        listed = run_cli("plans", "list", cache=cache)
        assert listed.returncode == 0 and key[:12] in listed.stdout, listed.stderr
        other = tmp_path / "model"
        tiny_model("bert", "AutoModelForSequenceClassification").save_pretrained(other)
        tuned = run_cli("tune", str(other), "--trials", "1", "--backends", "eager", cache=cache)
    assert tuned.returncode == 2, tuned.stderr
    (line,) = tuned.stderr.strip().splitlines()
    assert line.startswith(f"autocpu: error: cannot write to the autocpu cache {cache}")
    assert "AUTOCPU_CACHE_DIR" in line


def test_a_full_disk_is_one_line_and_keeps_the_plans_it_had(tmp_path):
    cache = tmp_path / "cache"
    with mounted(cache, "-t", "tmpfs", "-o", "size=2m", "tmpfs"):
        key = quick_tune(cache_dir=cache).plan.key
        (cache / "filler").write_bytes(b"")
        with contextlib.suppress(OSError), open(cache / "filler", "wb") as filler:
            while True:
                filler.write(b"x" * 65536)
                filler.flush()
        model = tiny_model("bert", "AutoModelForSequenceClassification")
        with pytest.raises(AutocpuError, match="cannot write to the autocpu cache") as raised:
            autocpu.tune(
                model,
                tiny_inputs("bert"),
                n_trials=1,
                backends=["eager"],
                isolation="none",
                cache_dir=cache,
            )
        assert "\n" not in str(raised.value)
        assert PlanCache(cache).load(key) is not None


def test_concurrent_tunes_never_measure_the_same_point_twice(
    model_dir, tmp_path, cache_dir, use_test_backends, monkeypatch
):
    use_test_backends(BARRIER)  # eager, behind a barrier both processes must reach
    monkeypatch.setenv("AUTOCPU_TEST_BARRIER", str(tmp_path / "barrier"))
    (tmp_path / "barrier").mkdir()
    space = 2 * autocpu.probe().usable_cpus  # eager under strict: 2 attentions x threads
    args = ["tune", str(model_dir), "--seq-len", "16", "--trials", str(space)]
    args += ["--isolation", "none", "--backends", "test_barrier", "--quiet"]
    env = {**os.environ, "AUTOCPU_CACHE_DIR": str(cache_dir)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "autocpu.cli", *args],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    (journal,) = (cache_dir / "studies").glob("*.journal")
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))
    )
    (name,) = optuna.get_all_study_names(storage)
    trials = optuna.load_study(study_name=name, storage=storage).trials
    measured = [
        json.dumps(
            [t.user_attrs["record"]["backend"], t.user_attrs["record"]["params"]], sort_keys=True
        )
        for t in trials
        if "record" in t.user_attrs and "repeat_of" not in t.user_attrs
    ]
    workers = {t.user_attrs["worker"] for t in trials if "record" in t.user_attrs}
    assert len(workers) == 2  # both processes took part
    assert sorted(measured) == sorted(set(measured)), "a point was measured twice"
    assert len(measured) == space


def test_temp_files_of_a_killed_write_are_removed_by_the_next_write(cache_dir):
    plan = quick_tune().plan
    cache = PlanCache()
    dead = cache.plans_dir / f".{plan.key}.json.0123456789ab.tmp"
    live = cache.plans_dir / f".{plan.key}.json.ba9876543210.tmp"
    for tmp in (dead, live):
        tmp.write_text("{half a pl")
    os.utime(dead, (1, 1))  # long ago: its writer is gone
    cache.save(plan)
    assert not dead.exists() and live.exists()  # a write in progress keeps its file
