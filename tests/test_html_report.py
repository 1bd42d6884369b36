"""The HTML report: written from real plans of tiny tunes, read back, and rendered by Chromium."""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import itertools
import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_inputs, tiny_model
from PIL import Image

import autocpu
from autocpu.errors import AutocpuError
from autocpu.html_report import pareto_front, write_report
from autocpu.plans import Plan
from autocpu.records import TrialRecord
from autocpu.report import format_params

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
SCRIPT = "<script>alert(1)</script>"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


@pytest.fixture(scope="module")
def plans(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Plan]]:
    """One lenient tune (lossy candidates pass) and one strict tune (they fail), ~5 s each.

    Torch runs one thread during the tunes: on 2 cores shared with other work, a 2-thread eager
    baseline stalls ~170 ms a call and the final interleaved run alone takes its 10 s cap.
    """
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("AUTOCPU_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
            yield {
                name: autocpu.tune(
                    model,
                    inputs,
                    n_trials=12,
                    backends=["eager", "onnxruntime"],
                    isolation="none",
                    cache=False,
                    tolerance=tolerance,
                ).plan
                for name, tolerance in TOLERANCES.items()
            }
    finally:
        torch.set_num_threads(threads)


#: "strict" here is tight yet still admits lossy candidates (autocpu does not even try bf16 or
#: int8 under the strict preset), so the figures get infeasible points to draw.
TOLERANCES = {"int8": "int8", "strict": {"max_rel": 1e-3, "min_cosine": 0.9999, "name": "tight"}}


@pytest.fixture(scope="module")
def hostile(plans: dict[str, Plan]) -> Plan:
    """The strict plan plus a failed and an ineligible trial carrying markup and mathtext."""
    failed = TrialRecord(
        "odd$backend^{", {"mode": "<b>x</b>"}, status="failed", build_s=0.4, reason=SCRIPT
    )
    ineligible = TrialRecord("ipex", {}, status="ineligible", reason="needs <intel> & x86")
    plan = plans["strict"]
    return dataclasses.replace(
        plan,
        decision=plan.decision + ' & "<i>quoted</i>"',
        trials=[*plan.trials, failed, ineligible],
    )


@pytest.fixture(scope="module")
def pages(
    plans: dict[str, Plan], hostile: Plan, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("reports")
    found = {name: write_report(plan, out / name) for name, plan in plans.items()}
    found["hostile"] = write_report(hostile, out / "hostile")
    return found


def figures(page: Path) -> list[bytes]:
    return [base64.b64decode(data) for data in DATA_URI.findall(page.read_text())]


class Dom(HTMLParser):
    """The parts of a page the tests look at: trial rows, images and script elements."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.rows: list[str] = []
        self.images: list[str] = []
        self.scripts = 0
        self._in_trials = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "table":
            self._in_trials = attributes.get("id") == "trials"
        elif tag == "tr" and self._in_trials and attributes.get("class"):
            self.rows.append(attributes["class"] or "")
        elif tag == "img":
            self.images.append(attributes.get("src") or "")
        elif tag == "script":
            self.scripts += 1


def test_tunes_give_feasible_and_infeasible_points(plans: dict[str, Plan]) -> None:
    """The figures are only worth checking if both kinds of point are there to draw."""
    lossy = plans["strict"].tolerance["max_rel"]
    passed = [t for t in plans["int8"].trials if (t.accuracy.max_rel if t.accuracy else 0) > lossy]
    assert any(t.status == "ok" for t in passed)
    assert any(t.status == "inaccurate" for t in plans["strict"].trials)


@pytest.mark.parametrize("name", ["int8", "strict"])
def test_page_names_winner_every_trial_and_decision(
    plans: dict[str, Plan], pages: dict[str, Path], name: str
) -> None:
    plan, page = plans[name], pages[name]
    text = page.read_text()
    assert page.name == f"report-{plan.key[:12]}.html"
    assert html.escape(f"{plan.backend} {format_params(plan.params)}") in text
    assert html.escape(plan.decision) in text
    assert html.escape(plan.machine["fingerprint"]) in text
    rows = Dom(text).rows
    assert len(rows) == len(plan.trials)
    assert sum("winner" in row for row in rows) >= 1
    for trial in plan.trials:
        assert f"<td>{html.escape(trial.backend)}</td>" in text


@pytest.mark.parametrize("name", ["int8", "strict", "hostile"])
def test_figures_are_embedded_pngs_matching_the_files(pages: dict[str, Path], name: str) -> None:
    page = pages[name]
    embedded = figures(page)
    files = [page.with_name(f"{page.stem}-{f}.png") for f in ("latency", "accuracy", "one-time")]
    assert embedded == [f.read_bytes() for f in files]
    for png in embedded:
        assert png.startswith(PNG_MAGIC)
        width, height = Image.open(io.BytesIO(png)).size
        assert width >= 800 and height >= 200


def test_plan_strings_are_escaped(hostile: Plan, pages: dict[str, Path]) -> None:
    text = pages["hostile"].read_text()
    assert SCRIPT not in text and "<i>quoted</i>" not in text and "<b>x</b>" not in text
    assert html.escape(SCRIPT) in text
    assert html.escape(hostile.decision) in text
    assert "needs &lt;intel&gt; &amp; x86" in text
    dom = Dom(text)
    assert dom.scripts == 0
    assert [row.split()[0] for row in dom.rows[-2:]] == ["failed", "ineligible"]


def test_no_matplotlib_is_one_error_with_the_fix(
    plans: dict[str, Plan], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import` sees when it is absent
    with pytest.raises(AutocpuError, match=r"matplotlib is not installed.*autocpu\[report\]"):
        write_report(plans["int8"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_importing_the_module_does_not_import_matplotlib() -> None:
    code = "import sys, autocpu.html_report; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def dominated(p: tuple[float, float], points: list[tuple[float, float]]) -> bool:
    return any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points)


def test_pareto_front_is_the_non_dominated_points() -> None:
    points = [(3.0, 1.0), (1.0, 5.0), (2.0, 2.0), (2.0, 3.0), (4.0, 1.0), (1.0, 5.0), (5.0, 0.5)]
    assert pareto_front(points) == [1, 5, 2, 0, 6]
    assert pareto_front([]) == []
    rng = random.Random(0)
    for n in range(1, 40):
        points = [(rng.randint(0, 6) / 2, rng.randint(0, 6) / 2) for _ in range(n)]
        front = pareto_front(points)
        assert sorted(front) == [i for i, p in enumerate(points) if not dominated(p, points)]
        assert all(points[a] <= points[b] for a, b in itertools.pairwise(front))


@pytest.fixture(scope="module")
def chromium() -> str:
    """The browser binary; a missing one skips locally but fails in CI, where it is installed.

    Module-scoped and asked for first, so a skip comes before the tunes, not after them.
    """
    found = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium binary in CI: run ci/install_chromium.sh first")
        pytest.skip("no chromium binary (install it with ci/install_chromium.sh)")
    return found


def run_browser(
    chromium: str, page: Path, profile: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        *args,
        page.as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)


def test_chromium_renders_the_page(
    chromium: str, hostile: Plan, pages: dict[str, Path], tmp_path: Path
) -> None:
    page = pages["hostile"]
    dom = Dom(run_browser(chromium, page, tmp_path / "profile", "--dump-dom").stdout)
    assert len(dom.rows) == len(hostile.trials)
    assert len(dom.images) == 3 and all(s.startswith("data:image/png;base64,") for s in dom.images)
    assert dom.scripts == 0

    shot = tmp_path / "shot.png"
    run_browser(
        chromium, page, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2000"
    )
    assert shot.read_bytes().startswith(PNG_MAGIC)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (2000, 1280, 3)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100
    # The winner's gold star is drawn only inside the figures: seeing it proves they decoded.
    gold = np.abs(pixels.astype(int) - (255, 215, 0)).max(axis=2) <= 8
    assert gold.sum() > 50
