"""The CLI end to end in fresh processes, and every bad input as one clear line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import run_cli, tiny_inputs, tiny_model

import autocpu
from autocpu.errors import AutocpuError
from autocpu.plans import PlanCache
from autocpu.report import inputs_cell


def test_cli_tune_then_a_fresh_process_reuses_the_plan(model_dir, cache_dir):
    args = (
        "tune",
        str(model_dir),
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--trials",
        "4",
        "--backends",
        "eager,torchscript",
    )
    first = run_cli(*args, cache=cache_dir)
    assert first.returncode == 0, first.stderr
    assert "trial" in first.stdout and "plan " in first.stdout
    second = run_cli(*args, "--json", cache=cache_dir)
    assert second.returncode == 0, second.stderr
    plan = json.loads(second.stdout)
    assert (plan["source"], plan["from_cache"]) == ("cache", True)
    third = run_cli(*args, cache=cache_dir)
    assert "reused: no trial ran" in third.stdout
    assert plan["task"] == "text-classification"
    assert plan["inputs"][0]["input_ids"]["shape"] == [2, 16]
    listed = run_cli("plans", "list", cache=cache_dir)
    assert plan["key"][:12] in listed.stdout
    cached = PlanCache(cache_dir).find(plan["key"])
    assert inputs_cell(cached) == "2x16 (1 batch) attention_mask, input_ids, token_type_ids"
    shown = run_cli("plans", "show", plan["key"][:6], cache=cache_dir)
    assert shown.returncode == 0 and plan["backend"] in shown.stdout
    reported = run_cli("report", plan["key"][:6], "-o", str(cache_dir / "report"), cache=cache_dir)
    assert reported.returncode == 0, reported.stderr
    assert (cache_dir / "report" / f"report-{plan['key'][:12]}.html").is_file()
    benched = run_cli(
        "bench",
        str(model_dir),
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--seconds",
        "1",
        cache=cache_dir,
    )
    assert benched.returncode == 0 and "speedup" in benched.stdout, benched.stderr
    exported = run_cli("plans", "export", "-o", str(cache_dir / "b.json"), cache=cache_dir)
    assert exported.returncode == 0 and "exported 1 plan(s)" in exported.stdout
    explained = run_cli("explain", plan["key"][:6], cache=cache_dir)
    assert explained.returncode == 0 and "WINNER: " in explained.stdout
    verified = run_cli(
        "plans", "verify", plan["key"][:6], "--model", str(model_dir), cache=cache_dir
    )
    assert verified.returncode == 0 and "holds" in verified.stdout, verified.stderr
    (cache_dir / "plans" / f"{plan['key']}.canary.pt").unlink()
    unverifiable = run_cli(
        "plans", "verify", plan["key"][:6], "--model", str(model_dir), cache=cache_dir
    )
    assert unverifiable.returncode == 1 and "no canary" in unverifiable.stdout
    removed = run_cli("plans", "rm", plan["key"][:6], cache=cache_dir)
    assert removed.returncode == 0 and not (cache_dir / "plans" / f"{plan['key']}.json").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("tune", "/nonexistent/model"), "no model directory"),
        (("plans", "show", "feedbeef"), "no plan matching"),
        (("tune", "{model_dir}", "--tolerance", "loose"), "bad tolerance"),
        (("tune", "{model_dir}", "--backends", "eager,warp"), "unknown backend 'warp'"),
        (("tune", "{model_dir}", "--task", "painting"), "unknown task"),
        (("tune", "{model_dir}", "--seq-len", "0"), "must be positive"),
    ],
)
def test_cli_errors_are_one_line_without_traceback(args, needle, model_dir, cache_dir):
    result = run_cli(*(a.format(model_dir=model_dir) for a in args), cache=cache_dir)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "--" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_cli_tune_flags_and_defaults_are_tune_options():
    from autocpu.cli import build_parser
    from autocpu.options import TuneOptions, from_cli

    bare = build_parser().parse_args(["tune", "some-dir"])
    assert TuneOptions(**from_cli(bare)) == TuneOptions()
    flags = ["--trials", "5", "--backends", "eager, torchscript", "--no-cache"]
    flags += ["--trial-timeout", "3", "--tolerance", "bf16", "--search", "exhaustive"]
    given = TuneOptions(**from_cli(build_parser().parse_args(["tune", "some-dir", *flags])))
    assert (given.n_trials, given.backends, given.cache) == (5, ["eager", "torchscript"], False)
    assert (given.trial_timeout, given.tolerance.name, given.search) == (3.0, "bf16", "exhaustive")


def test_api_bad_inputs_are_clear_errors():
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    cases = [
        (lambda: autocpu.tune("bert-base", inputs), "expected a torch.nn.Module"),
        (lambda: autocpu.tune(model, "some text"), "example_inputs must be"),
        (lambda: autocpu.tune(model, []), "example_inputs is empty"),
        (lambda: autocpu.tune(model, {"input_ids": [1, 2]}), "holds no tensors"),
        (
            lambda: autocpu.tune(model, {"pixel_values": torch.ones(1, 3)}),
            "rejected example_inputs",
        ),
        (lambda: autocpu.tune(model, inputs, backends=["nope"]), "unknown backend"),
        (lambda: autocpu.tune(model, inputs, backends="eager"), "non-empty list"),
        (lambda: autocpu.tune(model, inputs, tolerance=-1), "bad tolerance"),
        (lambda: autocpu.tune(model, inputs, n_trials=0), "n_trials"),
        (lambda: autocpu.tune(model, inputs, isolation="thread"), "isolation="),
        (lambda: autocpu.tune(model, inputs, trial_timeout=0), "trial_timeout"),
        (lambda: autocpu.tune(model, inputs, task="painting"), "unknown task 'painting'"),
        (lambda: autocpu.tune(model, inputs, memory_limit_gb=-1), "memory_limit_gb"),
        (lambda: autocpu.tune(model, inputs, timeout=0), "timeout=0"),
        (lambda: autocpu.tune(model, inputs, storage="nosuch://x"), "cannot open study storage"),
        (lambda: autocpu.tune(model.to(torch.bfloat16), inputs), "not float32"),
        (lambda: autocpu.apply_plan(model, "/no/such/plan.json"), "no plan file"),
    ]
    for call, needle in cases:
        with pytest.raises(AutocpuError) as info:
            call()
        assert needle in str(info.value) and "\n" not in str(info.value)
        model.float()


def test_corrupt_plan_is_moved_aside_and_good_plans_survive(cache_dir):
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    good = autocpu.tune(model, inputs, n_trials=2, backends=["eager"], isolation="none")
    other = autocpu.tune(
        model, tiny_inputs("bert", seq=12), n_trials=2, backends=["eager"], isolation="none"
    )
    path = PlanCache().path(good.plan.key)
    path.write_text(path.read_text()[:100])  # truncated mid-write by a crash, say
    retuned = autocpu.tune(model, inputs, n_trials=2, backends=["eager"], isolation="none")
    assert not retuned.from_cache
    moved = list((cache_dir / "corrupt").glob("*.json"))
    assert len(moved) == 1 and moved[0].read_text().startswith("{")
    assert path.exists()  # re-tuned plan written back
    assert PlanCache().load(other.plan.key) is not None  # the other plan untouched
    again = autocpu.tune(model, inputs, n_trials=2, backends=["eager"], isolation="none")
    assert again.from_cache


def test_plan_from_other_versions_is_not_used_and_user_is_told(cache_dir):
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    tuned = autocpu.tune(model, inputs, n_trials=2, backends=["eager"], isolation="none")
    path = PlanCache().path(tuned.plan.key)
    data = json.loads(path.read_text())
    data["versions"]["torch"] = "1.0.0"
    path.write_text(json.dumps(data))
    with pytest.warns(autocpu.AutocpuWarning, match=r"torch 1\.0\.0 -> "):
        again = autocpu.tune(model, inputs, n_trials=2, backends=["eager"], isolation="none")
    assert not again.from_cache


def test_import_autocpu_stays_light():
    code = (
        "import sys, autocpu; from autocpu.backends import all_backends; all_backends();"
        "autocpu.probe();"
        "heavy = [m for m in ('onnxruntime', 'openvino', 'optimum', 'nncf') if m in sys.modules];"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
