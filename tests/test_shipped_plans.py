"""The tuning database shipped in the package: small, canary-free, listed per machine."""

from __future__ import annotations

import json

import pytest

import autocpu
from autocpu.cli import main
from autocpu.sharing import SHIPPED_DB, bundle_text, read_bundle

#: The repository's shipped database must stay small enough to ship in the wheel.
MAX_SHIPPED_BYTES = 2 << 20


def test_the_shipped_database_is_small_and_holds_no_canaries():
    bundles = sorted(SHIPPED_DB.glob("*.json"))
    assert bundles and sum(p.stat().st_size for p in bundles) < MAX_SHIPPED_BYTES
    for path in bundles:
        shipped = read_bundle(path)
        assert shipped and all(entry.canary is None for entry in shipped), path.name
        assert {entry.plan.machine["fingerprint"] for entry in shipped} == {path.stem}


@pytest.fixture
def two_machines(tmp_path, monkeypatch):
    """A database with one plan measured on this machine and one measured elsewhere."""
    (here, *_), (elsewhere, *_) = (
        json.loads(path.read_text())["plans"] for path in sorted(SHIPPED_DB.glob("*.json"))[:2]
    )
    here["plan"]["machine"]["fingerprint"] = autocpu.probe().fingerprint()
    elsewhere["plan"]["machine"]["fingerprint"] = "0" * 16
    (tmp_path / "db.json").write_text(bundle_text([here, elsewhere]))
    monkeypatch.setenv("AUTOCPU_TUNING_DB", str(tmp_path))
    return here["plan"]["key"]


def test_plans_list_shipped_shows_this_machines_plans_only(two_machines, capsys):
    assert main(["plans", "list", "--shipped", "--json"]) == 0
    assert [plan["key"] for plan in json.loads(capsys.readouterr().out)] == [two_machines]
    assert main(["plans", "list", "--shipped"]) == 0
    table = capsys.readouterr().out
    assert "shipped plans for this machine" in table and two_machines[:12] in table


def test_plans_list_shipped_says_when_none_match(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AUTOCPU_TUNING_DB", str(tmp_path))
    assert main(["plans", "list", "--shipped"]) == 0
    assert "no shipped plans for this machine" in capsys.readouterr().out
    assert main(["plans", "show", "abc", "--shipped"]) == 2
    assert "--shipped goes with 'plans list'" in capsys.readouterr().err


def test_only_fp32_exact_shipped_plans_seed_a_search(monkeypatch):
    """A bf16 or int8 winner's precision is no choice of a strict search's space."""
    from autocpu.sharing import seeds, tuning_db

    monkeypatch.setenv("AUTOCPU_TUNING_DB", str(SHIPPED_DB))
    plans = [entry.plan for entry in tuning_db()]
    strict = next(p for p in plans if p.tolerance["name"] == "strict")
    kind = {k: strict.model[k] for k in ("architecture", "config")}
    same = [
        p
        for p in plans
        if {k: p.model.get(k) for k in kind} == kind
        and p.machine["family_key"] == strict.machine["family_key"]
    ]
    assert {p.tolerance["name"] for p in same} >= {"strict", "bf16", "int8"}
    found = seeds(strict.model, strict.machine["family_key"])
    expected = [(p.backend, p.params) for p in same if p.tolerance["name"] == "strict"]
    assert found == expected
