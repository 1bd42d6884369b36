"""Plans that travel: one-file bundles (``autocpu plans export/import``) and the tuning
database of pre-tuned plans shipped inside the package (``autocpu/tuning_db/``), like TVM's
TopHub.

A bundle is JSON: every plan with its canary (base64), so an imported plan checks itself on
its first use like a locally tuned one. A canary may be left out, and the shipped bundles hold
none: the plan key pins the model's weights and input shapes, so ``tune()`` makes the canary
from the model it is given on the plan's first use, and the database stays small enough to ship
in the wheel. ``tune()`` looks in the tuning database after the user cache: a plan with the
exact key is used without searching; plans for the same model on the same CPU family and ISA
only seed the search (their settings are tried first).
"""

from __future__ import annotations

import base64
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autocpu.errors import AutocpuError, AutocpuWarning, one_line
from autocpu.plans import Plan, PlanCache, atomic_write, writing

BUNDLE_FORMAT = 1
#: Overrides where the tuning database is read from.
TUNING_DB_ENV = "AUTOCPU_TUNING_DB"
#: The shipped database: package data, so it is wherever the package is installed.
SHIPPED_DB = Path(__file__).resolve().parent / "tuning_db"


@dataclass(frozen=True)
class SharedPlan:
    plan: Plan
    canary: bytes | None


def export_bundle(cache: PlanCache, keys: list[str], path: Path) -> list[Plan]:
    """Write the plans (all, or those whose keys start with ``keys``) into one file."""
    plans = [cache.find(k) for k in keys] if keys else cache.all()
    entries = []
    for plan in plans:
        canary = cache.canary_path(plan.key)
        entries.append(
            {
                "plan": json.loads(plan.to_json()),
                "canary": base64.b64encode(canary.read_bytes()).decode()
                if canary.exists()
                else None,
            }
        )
    atomic_write(path, bundle_text(entries))
    return plans


def bundle_text(entries: list[dict[str, Any]]) -> str:
    """A bundle as compact JSON with one plan a line, so a changed plan is a one-line diff."""
    lines = ",\n".join(json.dumps(entry, separators=(",", ":")) for entry in entries)
    return f'{{"autocpu_bundle":{BUNDLE_FORMAT},"plans":[\n{lines}\n]}}\n'


def read_bundle(path: Path) -> list[SharedPlan]:
    try:
        data = json.loads(path.read_text())
        if data.get("autocpu_bundle") != BUNDLE_FORMAT:
            raise ValueError(f"not an autocpu bundle of format {BUNDLE_FORMAT}")
        return [
            SharedPlan(
                Plan.from_dict(entry["plan"]),
                base64.b64decode(entry["canary"]) if entry.get("canary") else None,
            )
            for entry in data["plans"]
        ]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise AutocpuError(
            f"cannot read plan bundle {path} ({one_line(error, 120)})",
            "pass a file written by 'autocpu plans export'",
        ) from None


def install(cache: PlanCache, shared: SharedPlan) -> None:
    """Put a shared plan (and its canary) into the cache, as if tuned here."""
    if shared.canary is not None:
        with writing(cache.root):
            atomic_write(cache.canary_path(shared.plan.key), shared.canary)
    cache.save(shared.plan)


def import_bundle(cache: PlanCache, path: Path) -> list[Plan]:
    shared = read_bundle(path)
    for entry in shared:
        install(cache, entry)
    return [entry.plan for entry in shared]


def tuning_db_dir() -> Path:
    """``AUTOCPU_TUNING_DB``, else the database shipped in the package."""
    override = os.environ.get(TUNING_DB_ENV)
    return Path(override) if override else SHIPPED_DB


def tuning_db() -> list[SharedPlan]:
    """Every shipped plan; a bundle that cannot be read is skipped with a warning, so one bad
    file never blocks a tune."""
    folder = tuning_db_dir()
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.json")):
        try:
            found += read_bundle(path)
        except AutocpuError as error:
            warnings.warn(
                f"shipped plans skipped: {error.problem} -- fix or remove the file, or point "
                f"{TUNING_DB_ENV} at another folder",
                AutocpuWarning,
                stacklevel=2,
            )
    return found


def shipped_plan(key: str) -> SharedPlan | None:
    """The tuning database's plan for exactly this key (model, inputs, machine, tolerance)."""
    return next((entry for entry in tuning_db() if entry.plan.key == key), None)


def shipped_for(fingerprint: str) -> list[Plan]:
    """The tuning database's plans measured on machines with this fingerprint: the ones an
    exact match can come from here."""
    return [e.plan for e in tuning_db() if e.plan.machine.get("fingerprint") == fingerprint]


def seeds(model: dict[str, str], family: str) -> list[tuple[str, dict[str, Any]]]:
    """Winning settings of fp32-exact shipped plans for this architecture and config on the same
    CPU family and ISA set: worth trying first, not trusting blindly.

    Only plans tuned under a tolerance that rules out bf16 and int8 seed: their settings lie in
    every search's space, while a bf16 or int8 winner's precision is no choice a strict search
    offers (Optuna refuses a queued value outside a parameter's choices). A loose search tries
    each backend's bf16/int8 recipes first anyway.
    """
    from autocpu.accuracy import Tolerance  # torch: only when a search starts

    found = []
    for entry in tuning_db():
        plan = entry.plan
        same_model = (plan.model.get("architecture"), plan.model.get("config")) == (
            model.get("architecture"),
            model.get("config"),
        )
        exact = not Tolerance.parse(plan.tolerance).admits_lossy
        if same_model and exact and plan.machine.get("family_key") == family:
            found.append((plan.backend, plan.params))
    return found
