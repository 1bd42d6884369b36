"""Plans made in one environment are never used in another: the legacy lane (torch 2.8) and the
main one (torch 2.13) share a cache here, and each refuses the other's plan, naming the versions.

Runs when ``AUTOCPU_OTHER_PYTHON`` names the other environment's interpreter (ci/legacy_lane.sh
sets it to the main ``.venv``'s python).
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
from pathlib import Path

import pytest
import torch

import autocpu
from autocpu.api import AutocpuWarning
from autocpu.plans import PlanCache

OTHER_PYTHON = os.environ.get("AUTOCPU_OTHER_PYTHON", "")
pytestmark = pytest.mark.skipif(
    not OTHER_PYTHON, reason="set AUTOCPU_OTHER_PYTHON to another environment's python"
)
TESTS = Path(__file__).resolve().parent

#: Tunes the same tiny model as this file does, in the cache given, and prints what it used.
TUNE = """
import sys, warnings
sys.path.insert(0, {tests!r})
from conftest import tiny_inputs, tiny_model
import autocpu, torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    tuned = autocpu.tune(tiny_model("bert"), tiny_inputs("bert"), n_trials=1,
                         backends=["eager"], isolation="none", cache_dir={cache!r})
print("TORCH", torch.__version__)
print("FROM_CACHE", tuned.from_cache)
for w in caught:
    print("WARNING", w.message)
"""


def tune_in_other_environment(cache: Path) -> str:
    root = TESTS.parent
    env = {**os.environ, "PYTHONPATH": str(root)}  # this checkout's autocpu, whichever installed
    done = subprocess.run(
        [OTHER_PYTHON, "-c", TUNE.format(tests=str(TESTS), cache=str(cache))],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def tune_here(cache: Path) -> tuple[autocpu.TunedModel, list[str]]:
    from conftest import tiny_inputs, tiny_model

    with pytest.warns(AutocpuWarning) as caught:
        tuned = autocpu.tune(
            tiny_model("bert"),
            tiny_inputs("bert"),
            n_trials=1,
            backends=["eager"],
            isolation="none",
            cache_dir=cache,
        )
    return tuned, [str(w.message) for w in caught]


def test_each_environment_refuses_the_others_plan_and_says_which_versions_differ(tmp_path):
    cache = tmp_path / "shared-cache"
    out = tune_in_other_environment(cache)
    other_torch = out.split("TORCH ", 1)[1].split()[0]
    assert other_torch != torch.__version__, "AUTOCPU_OTHER_PYTHON runs this same torch"
    [theirs] = PlanCache(cache).all()

    tuned, messages = tune_here(cache)
    assert not tuned.from_cache
    changed = f"torch {theirs.versions['torch']} -> {importlib.metadata.version('torch')}"
    refused = [m for m in messages if "not used: versions changed" in m]
    assert refused and changed in refused[0], messages
    [ours] = PlanCache(cache).all()  # re-tuned here: the plan now carries this environment
    assert ours.versions["torch"] != theirs.versions["torch"]

    back = tune_in_other_environment(cache)  # and the other way round
    assert "FROM_CACHE False" in back
    assert f"torch {ours.versions['torch']} -> {theirs.versions['torch']}" in back, back
