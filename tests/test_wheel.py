"""The built wheel, installed outside the repository, ships its tuning database and uses it.

The shipped bundles hold plans for the benchmark models on the machines that measured them, so
none need match here. The test writes a bundle for a tiny model tuned on this machine into a
copy of the source tree, builds the wheel from that copy, installs it into a fresh virtualenv
and tunes the same tiny model there (seeded, so the same weights and key in every process).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
from conftest import TESTS, tiny_inputs, tiny_model

import autocpu
from autocpu.plans import PlanCache
from autocpu.sharing import SHIPPED_DB, export_bundle

ROOT = TESTS.parent
BACKENDS = ["eager", "torchscript"]
TEST_BUNDLE = "test-tiny-bert.json"

#: Runs in the fresh virtualenv, from a folder outside the repository.
SHIPPED_TUNE = textwrap.dedent(
    f"""
    import json, sys
    sys.path.append({str(TESTS)!r})  # conftest's tiny models; no autocpu there
    from conftest import tiny_inputs, tiny_model
    import autocpu

    calls = []
    tuned = autocpu.tune(
        tiny_model("bert"), tiny_inputs("bert"), n_trials=3, backends={BACKENDS!r},
        isolation="none", progress=calls.append,
    )
    print(json.dumps({{"source": tuned.source, "key": tuned.plan.key, "trials": len(calls),
                      "package": autocpu.__file__}}))
    """
)


def _source_tree(destination: Path, bundle: Path) -> Path:
    """The files the wheel is built from, with ``bundle`` added to the shipped database."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "autocpu", destination / "autocpu", ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, destination / name)
    shutil.copy2(bundle, destination / "autocpu" / "tuning_db" / TEST_BUNDLE)
    return destination


def _build_wheel(source: Path, out: Path) -> Path:
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    subprocess.run([*command, "--no-index", "-w", str(out), str(source)], check=True)
    (wheel,) = out.glob("autocpu-*.whl")
    return wheel


def _fresh_venv(path: Path) -> Path:
    """A virtualenv whose own site-packages comes first, then this environment's (a ``.pth``
    line, so torch and the rest are not reinstalled). A ``.pth`` line adds the folder without
    running the ``.pth`` files in it, so the repository's editable install stays out."""
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(path)],
        check=True,
    )
    python = path / "bin" / "python"
    own = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(own, "autocpu-test-base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _require_offline_build() -> None:
    """The build runs without isolation (offline): it needs pyproject's setuptools here, and
    the ``wheel`` package where that setuptools predates its own bdist_wheel (70.1)."""
    setuptools = pytest.importorskip("setuptools", minversion="68")
    if tuple(int(part) for part in setuptools.__version__.split(".")[:2]) < (70, 1):
        pytest.importorskip("wheel")


@pytest.mark.slow
def test_a_wheel_installed_elsewhere_uses_its_shipped_plan(tmp_path):
    _require_offline_build()
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    here = autocpu.tune(model, inputs, n_trials=3, backends=BACKENDS, isolation="none")
    bundle = tmp_path / TEST_BUNDLE
    export_bundle(PlanCache(), [here.plan.key], bundle)
    data = json.loads(bundle.read_text())
    data["plans"][0]["canary"] = None  # as every shipped plan: made from the model on first use
    bundle.write_text(json.dumps(data))

    wheel = _build_wheel(_source_tree(tmp_path / "src", bundle), tmp_path / "dist")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {f"autocpu/tuning_db/{p.name}" for p in SHIPPED_DB.glob("*.json")}
    assert shipped and shipped | {f"autocpu/tuning_db/{TEST_BUNDLE}"} <= set(names)

    venv = tmp_path / "venv"
    python = _fresh_venv(venv)
    install = [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q"]
    subprocess.run([*install, "--ignore-installed", str(wheel)], check=True)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("AUTOCPU_TUNING_DB", "PYTHONPATH")}
    env["AUTOCPU_CACHE_DIR"] = str(tmp_path / "empty-cache")
    run = subprocess.run(
        [str(python), "-c", SHIPPED_TUNE],
        cwd=elsewhere,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(run.stdout.splitlines()[-1])
    assert Path(result["package"]).resolve().is_relative_to(venv.resolve())
    assert (result["source"], result["key"], result["trials"]) == ("tuning_db", here.plan.key, 0)
    assert PlanCache(tmp_path / "empty-cache").canary_path(here.plan.key).exists()

    listed = subprocess.run(
        [str(venv / "bin" / "autocpu"), "plans", "list", "--shipped", "--json"],
        cwd=elsewhere,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    assert here.plan.key in {plan["key"] for plan in json.loads(listed.stdout)}
