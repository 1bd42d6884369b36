"""Trials that crash, hang or blow up memory; interrupted and concurrent tunes; corrupt files."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys

import optuna
import pytest
import torch
from conftest import tiny_inputs, tiny_model
from misbehaving_backends import ALL as MISBEHAVING
from misbehaving_backends import BARRIER, CALL_NOTING, FINALS_CRASH, ROUNDS_CRASH

import autocpu
from autocpu.plans import PlanCache


@pytest.fixture
def misbehaving(use_test_backends):
    use_test_backends(MISBEHAVING)


def test_segfault_abort_hang_and_memory_blowup_are_failed_trials(misbehaving, cache_dir):
    names = ["eager", "test_segfault", "test_abort", "test_hang", "test_memory_hog"]
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    tuned = autocpu.tune(
        model, inputs, n_trials=5, backends=names, trial_timeout=30, memory_limit_gb=1.5
    )
    reasons = {t.backend: t.reason for t in tuned.plan.trials if t.status == "failed"}
    assert "SIGSEGV" in reasons["test_segfault"]
    assert "SIGABRT" in reasons["test_abort"]
    assert reasons["test_hang"].startswith("hung: no result after 30 s")
    assert "exceeded the memory limit" in reasons["test_memory_hog"]
    assert tuned.plan.backend == "eager" and tuned.plan.measured_in == "worker processes"
    assert tuned(**inputs).last_hidden_state.shape == (2, 16, 32)  # and this process lives on


@pytest.mark.parametrize("isolation", ["process", "none"])
def test_each_finalist_is_timed_in_a_warm_process_of_its_own(
    isolation, use_test_backends, cache_dir, tmp_path, monkeypatch
):
    use_test_backends(CALL_NOTING)
    monkeypatch.setenv("AUTOCPU_TEST_CALLS", str(tmp_path))
    names = ["test_calls_a", "test_calls_b"]
    tuned = autocpu.tune(
        tiny_model("bert"), tiny_inputs("bert"), n_trials=2, backends=names, isolation=isolation
    )
    assert {t.backend for t in tuned.plan.trials if t.speedup} >= set(names)  # both in the finals
    pids = {
        name: {int(p.name.rsplit("-", 1)[1]) for p in tmp_path.glob(f"{name}-*")} for name in names
    }
    if isolation == "none":
        assert pids == {name: {os.getpid()} for name in names}
    else:  # a worker per trial, then one per finalist: no process ran both, nor the tuner
        assert len(pids["test_calls_a"]) == len(pids["test_calls_b"]) == 2
        assert not pids["test_calls_a"] & pids["test_calls_b"]
        assert os.getpid() not in pids["test_calls_a"] | pids["test_calls_b"]


@pytest.mark.parametrize(
    ("backends", "name"),
    [(FINALS_CRASH, "test_finals_crash"), (ROUNDS_CRASH, "test_rounds_crash")],
    ids=["when-built", "during-the-rounds"],
)
def test_a_finalist_whose_worker_crashes_fails_in_one_line_and_is_dropped(
    backends, name, use_test_backends, cache_dir, tmp_path, monkeypatch
):
    use_test_backends(backends)
    monkeypatch.setenv("AUTOCPU_TEST_CALLS", str(tmp_path))
    tuned = autocpu.tune(
        tiny_model("bert"), tiny_inputs("bert"), n_trials=2, backends=["eager", name]
    )
    crashed = next(t for t in tuned.plan.trials if t.backend == name)
    assert crashed.status == "failed" and "crashed: killed by SIGSEGV" in crashed.reason
    assert "\n" not in crashed.reason and tuned.plan.backend != name


def cli(*args, cache, **kwargs):
    env = {**os.environ, "AUTOCPU_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "autocpu.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def tune_args(model_dir, trials: int, *extra: str) -> tuple[str, ...]:
    """A quick in-process CLI tune of the tiny model, printing the plan as JSON."""
    return (
        "tune",
        str(model_dir),
        "--seq-len",
        "16",
        "--trials",
        str(trials),
        "--isolation",
        "none",
        "--backends",
        "eager,torchscript",
        *extra,
        "--json",
    )


def test_a_tune_killed_with_sigkill_resumes_without_repeating_trials(model_dir, cache_dir):
    args = tune_args(model_dir, 7)
    first = cli(*args, cache=cache_dir)
    seen = []
    for line in first.stdout:
        if line.startswith("trial"):
            seen.append(line)
        if len(seen) == 3:
            os.kill(first.pid, signal.SIGKILL)
            break
    first.wait()
    assert first.returncode == -signal.SIGKILL and not (cache_dir / "plans").exists()
    second = cli(*args, cache=cache_dir)
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out
    plan = json.loads(out[out.index("{\n") :])
    assert plan["study_trials"] == 7
    assert len(plan["trials"]) == 1 + 7  # the baseline and 7 candidates: the killed one is not
    resumed_lines = [ln for ln in out.splitlines() if ln.startswith("trial")]
    assert len(resumed_lines) <= 7 - 2  # at least the 2 trials finished before the kill
    first_latencies = {ln.split()[3] for ln in seen[:2]}
    plan_latencies = {f"{t['latency']['median_ms']:.2f}" for t in plan["trials"] if t["latency"]}
    assert first_latencies <= plan_latencies  # their results were kept, not re-measured


def test_a_trial_killed_mid_run_is_measured_when_its_study_resumes(cache_dir, caplog):
    """Left as a failed trial, its point would count as tried: an exhaustive sweep resumed after
    the kill stopped one point short (the AMX machine's MiniLM b8 oracle: 125 of 126)."""
    from autocpu.search import make_sampler
    from autocpu.storage import open_study

    points = ["a", "b", "c"]
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    killed.wait()
    study = open_study("killed", "machine", cache_dir, sampler=make_sampler("exhaustive"))
    trial = study.ask()
    trial.suggest_categorical("x", points)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{killed.pid}")  # as the search does
    with caplog.at_level(logging.INFO, logger="autocpu.storage"):
        resumed = open_study("killed", "machine", cache_dir, sampler=make_sampler("exhaustive"))
    assert "1 trial(s) interrupted by a killed tune are queued to run again" in caplog.text
    resumed.optimize(lambda t: float(points.index(t.suggest_categorical("x", points))))
    measured = resumed.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert sorted(t.params["x"] for t in measured) == points


def test_two_concurrent_tunes_on_one_cache(model_dir, cache_dir):
    args = tune_args(model_dir, 4)
    procs = [cli(*args, cache=cache_dir) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    plans = [json.loads(out[out.index("{\n") :]) for out in outputs]
    assert plans[0]["key"] == plans[1]["key"]
    saved = json.loads(PlanCache(cache_dir).path(plans[0]["key"]).read_text())
    assert 4 <= saved["study_trials"] <= 5  # one shared study and budget
    assert not (cache_dir / "corrupt").exists()


def test_a_corrupt_study_file_is_moved_aside_and_the_tune_proceeds(cache_dir):
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    first = autocpu.tune(model, inputs, n_trials=2, backends=["eager"], isolation="none")
    journal = next((cache_dir / "studies").glob("*.journal"))
    journal.write_bytes(b"\x00garbage{not json\n" * 3)
    PlanCache().remove(first.plan.key)
    again = autocpu.tune(model, inputs, n_trials=2, backends=["eager"], isolation="none")
    assert again.plan.study_trials == 2
    moved = list((cache_dir / "corrupt").glob("*.journal"))
    assert len(moved) == 1 and moved[0].read_bytes().startswith(b"\x00garbage")


POSTGRES = os.environ.get("AUTOCPU_TEST_POSTGRES")


@pytest.mark.skipif(not POSTGRES, reason="set AUTOCPU_TEST_POSTGRES (.ci/run starts a server)")
def test_two_machines_share_one_study_in_postgresql(
    model_dir, tmp_path, monkeypatch, use_test_backends
):
    import optuna

    for name in optuna.get_all_study_names(POSTGRES):  # a clean study per run
        optuna.delete_study(study_name=name, storage=POSTGRES)
    # Eager behind a barrier: the first process to start cannot finish the study alone.
    use_test_backends(BARRIER)
    monkeypatch.setenv("AUTOCPU_TEST_BARRIER", str(tmp_path / "barrier"))
    (tmp_path / "barrier").mkdir()
    # A budget smaller than the space (eager: 2 attentions x threads), so it binds, not the space.
    budget = 2 * autocpu.probe().usable_cpus - 1
    args = [*tune_args(model_dir, budget, "--storage", POSTGRES)]
    args[args.index("eager,torchscript")] = "test_barrier"
    caches = [tmp_path / "machine-a", tmp_path / "machine-b"]
    procs = [cli(*args, cache=cache) for cache in caches]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    plans = [json.loads(out[out.index("{\n") :]) for out in outputs]
    last = max(plans, key=lambda p: p["created"])
    assert budget <= last["study_trials"] <= budget + 1  # one budget for both
    (name,) = optuna.get_all_study_names(POSTGRES)
    study = optuna.load_study(study_name=name, storage=POSTGRES)
    measured = [
        t.user_attrs
        for t in study.trials
        if "record" in t.user_attrs and "repeat_of" not in t.user_attrs
    ]
    assert len({m["worker"] for m in measured}) == 2  # both processes measured trials
    points = {
        (m["record"]["backend"], json.dumps(m["record"]["params"], sort_keys=True))
        for m in measured
    }
    in_plan = [
        (t["backend"], json.dumps(t["params"], sort_keys=True))
        for t in last["trials"]
        if t.get("worker")
    ]
    assert sorted(in_plan) == sorted(points)  # every point either measured, each once


class PlainModule(torch.nn.Module):
    """Not a transformers model: nothing to save_pretrained for a worker."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(100, 8)

    def forward(self, input_ids: torch.Tensor) -> dict:
        return {"hidden": self.embed(input_ids).relu()}


def test_a_model_that_cannot_be_saved_is_tuned_in_process_with_a_warning(cache_dir):
    inputs = {"input_ids": torch.randint(0, 100, (2, 8))}
    with pytest.warns(autocpu.AutocpuWarning, match="cannot be saved for worker processes"):
        tuned = autocpu.tune(PlainModule().eval(), inputs, n_trials=2, backends=["eager"])
    assert tuned.plan.measured_in == "in-process"
    assert torch.equal(tuned(**inputs)["hidden"], tuned.model(**inputs)["hidden"])


def test_a_study_from_another_machine_is_refused(cache_dir):
    from autocpu.errors import AutocpuError
    from autocpu.storage import open_study

    open_study("somekey", "fingerprint-a", cache_dir)
    assert open_study("somekey", "fingerprint-a", cache_dir).user_attrs
    with pytest.raises(AutocpuError, match="measured on a machine with fingerprint fingerprint-a"):
        open_study("somekey", "fingerprint-b", cache_dir)
