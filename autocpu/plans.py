"""Plans (what won, how it was measured, what it holds for) and the on-disk cache of them.

A plan is JSON, one file per (model, inputs, machine, tolerance, backends) key, written
atomically under a file lock so concurrent tunes and readers never see half a file. A corrupt
file is moved aside (never deleted) and reported in one line.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.metadata
import json
import logging
import os
import platform
import re
import secrets
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import platformdirs
from filelock import FileLock

from autocpu.errors import AutocpuError, AutocpuWarning, one_line
from autocpu.hashing import stable_hash
from autocpu.measure import LatencyStats
from autocpu.records import AccuracyReport, GenerationStats, TrialRecord, checked_fields

log = logging.getLogger(__name__)

PLAN_FORMAT = 1
#: A plan key as plan_key() makes it. Keys arrive from bundles, the shipped database and users,
#: and become file names: nothing else may, so no key reaches outside the cache.
KEY_PATTERN = re.compile(r"[0-9a-f]{20}")
KEY_PREFIX_PATTERN = re.compile(r"[0-9a-f]{1,20}")
#: Age after which a temp file of an atomic write belongs to a write that died.
STALE_TEMP_S = 600.0
#: Overrides where the cache lives.
CACHE_DIR_ENV = "AUTOCPU_CACHE_DIR"
CORE_PACKAGES = ("autocpu", "torch", "transformers")


def cache_root() -> Path:
    """``AUTOCPU_CACHE_DIR`` if set, else the platform's user cache folder."""
    override = os.environ.get(CACHE_DIR_ENV)
    return Path(override) if override else Path(platformdirs.user_cache_dir("autocpu"))


def package_versions(packages: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Installed versions; an imported package without metadata (a source tree on PYTHONPATH)
    gives its ``__version__``."""
    found = {}
    for name in packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = getattr(sys.modules.get(name), "__version__", "not installed")
    return found


def plan_key(
    model: dict[str, str],
    inputs: list[dict[str, Any]],
    machine: str,
    tolerance: dict[str, Any],
    backends: list[str] | None,
    search: str = "tpe",
    workload: dict[str, Any] | None = None,
) -> str:
    """What a plan is valid for. Versions are checked on load instead, to say what changed.

    An exhaustive search gets keys of its own, so asking for the sweep never returns a
    sampled plan; a TPE search adds nothing to the identity. Likewise ``workload`` (its name
    and settings) counts unless it is the forward pass, which adds nothing."""
    identity = {
        "model": model,
        "inputs": inputs,
        "machine": machine,
        "tolerance": tolerance,
        "backends": sorted(backends) if backends else "all",
    }
    if search != "tpe":
        identity["search"] = search
    if workload and workload.get("name", "forward") != "forward":
        identity["workload"] = workload
    return stable_hash(identity, 20)


@dataclass
class Plan:
    """The winner of a tune and the evidence for it."""

    key: str
    backend: str
    params: dict[str, Any]
    task: str
    model: dict[str, str]
    inputs: list[dict[str, Any]]
    machine: dict[str, Any]
    tolerance: dict[str, Any]
    versions: dict[str, str]
    backends: list[str] | None = None
    #: What was measured (see autocpu.workloads), and its settings (max_new_tokens).
    workload: str = "forward"
    workload_settings: dict[str, Any] = field(default_factory=dict)
    baseline: LatencyStats | None = None
    winner: LatencyStats | None = None
    speedup: float = 1.0
    speedup_iqr: list[float] = field(default_factory=lambda: [1.0, 1.0])
    #: Generation plans: TTFT, TPOT and tokens/s of fp32 eager and of the winner.
    baseline_generation: GenerationStats | None = None
    winner_generation: GenerationStats | None = None
    accuracy: AccuracyReport | None = None
    one_time_costs: dict[str, float] = field(default_factory=dict)
    decision: str = ""
    trials: list[TrialRecord] = field(default_factory=list)
    tune_seconds: float = 0.0
    study_trials: int = 0
    search: str = "tpe"
    cpu_busy_percent: float = 0.0
    measured_in: str = "in-process"
    #: True when the finals found no quiet rounds: the speedup holds for a machine as busy as
    #: that one was (``load_percent`` of its CPUs used by other work), not for a quiet one.
    #: ``autocpu bench --update`` re-measures it.
    measured_under_load: bool = False
    load_percent: float = 0.0
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    format: int = PLAN_FORMAT

    def __post_init__(self) -> None:
        check_key(self.key)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["accuracy"] = self.accuracy.to_dict() if self.accuracy else {}
        data["trials"] = [trial.to_dict() for trial in self.trials]
        for name in ("baseline", "winner"):
            data[name] = data[name] or {}
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """A plan from its JSON; a ValueError names the first field missing or of a wrong type
        (a file another version, a crash or a hand wrote, or a hostile bundle)."""
        values = checked_fields(cls, data)
        for name in ("baseline", "winner"):
            stats = values.get(name)
            values[name] = LatencyStats(**checked_fields(LatencyStats, stats)) if stats else None
        accuracy = values.get("accuracy")
        values["accuracy"] = AccuracyReport.from_dict(accuracy) if accuracy else None
        for name in ("baseline_generation", "winner_generation"):
            stats = values.get(name)
            values[name] = GenerationStats.from_dict(stats) if stats else None
        values["trials"] = [TrialRecord.from_dict(t) for t in values.get("trials", [])]
        return cls(**values)

    @property
    def winning_trial(self) -> TrialRecord | None:
        """The trial the plan's backend and settings came from (the baseline's if none won)."""
        return next(
            (t for t in self.trials if (t.backend, t.params) == (self.backend, self.params)), None
        )

    def ranked_trials(self) -> list[TrialRecord]:
        """Every trial as the reports show them: the winner first, then the fastest."""
        winner = self.winning_trial
        return sorted(self.trials, key=lambda t: (t is not winner, t.median_ms))

    def why_unusable(self, machine_fingerprint: str) -> str | None:
        """Why this plan cannot be used on this machine with the running versions, if not."""
        if self.machine.get("fingerprint") != machine_fingerprint:
            return "it was measured on another machine (fingerprint differs)"
        changed = self.version_mismatches()
        if changed:
            return f"versions changed since it was measured ({', '.join(changed)})"
        return None

    def version_mismatches(self) -> list[str]:
        """What differs between the versions that measured this plan and the running ones."""
        running = current_versions(
            [k for k in self.versions if k not in (*CORE_PACKAGES, "python")]
        )
        return [
            f"{name} {self.versions.get(name, 'absent')} -> {version}"
            for name, version in running.items()
            if self.versions.get(name) != version
        ]

    def summary(self) -> str:
        return (
            f"{self.backend} {self.params} x{self.speedup:.2f} "
            f"({self.speedup_iqr[0]:.2f}-{self.speedup_iqr[1]:.2f}) on {self.machine.get('brand')}"
        )


def check_key(key: Any) -> str:
    """``key`` if it is a plan key (20 hex digits), else a ValueError saying what it is."""
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
        raise ValueError(f"{key!r:.60} is not a plan key (20 hex digits)")
    return key


def current_versions(extra_packages: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    versions = package_versions([*CORE_PACKAGES, *extra_packages])
    versions["python"] = platform.python_version()
    return versions


def versions_id(versions: dict[str, str]) -> str:
    """Short hash of package versions: a study resumes only under the same versions."""
    return stable_hash(versions, 8)


class PlanCache:
    """Plans on disk: ``<root>/plans/<key>.json``; corrupt files go to ``<root>/corrupt``."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root else cache_root()

    @property
    def plans_dir(self) -> Path:
        return self.root / "plans"

    def artifacts_dir(self, model_id: str) -> Path:
        return self.root / "artifacts" / model_id

    def path(self, key: str) -> Path:
        """``plans/<key>.json``; a ValueError for anything but a plan key, or a path that
        resolves outside the cache (a planted symlink)."""
        path = self.plans_dir / f"{check_key(key)}.json"
        if not path.resolve().is_relative_to(self.plans_dir.resolve()):
            raise ValueError(f"{path} resolves outside {self.plans_dir}")
        return path

    def canary_path(self, key: str) -> Path:
        """The plan's probe input and reference outputs (see autocpu.canary)."""
        return self.path(key).with_suffix(".canary.pt")

    def _lock(self, path: Path) -> FileLock:
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(path) + ".lock", timeout=60)

    def save(self, plan: Plan) -> Path:
        path = self.path(plan.key)
        with writing(self.root), self._lock(path):
            atomic_write(path, plan.to_json())
        return path

    def load(self, key: str) -> Plan | None:
        path = self.path(key)
        if not path.exists():
            return None
        return self.read(path)

    def read(self, path: Path) -> Plan | None:
        """Read one plan file; a corrupt one is moved aside and reported, never deleted.

        Reading takes no lock (plans are replaced atomically, so a reader never sees half a
        file), which keeps a read-only cache readable."""
        try:
            return Plan.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError, UnicodeDecodeError) as error:
            move_aside(path, self.root, "plan", error)
            return None

    def all(self) -> list[Plan]:
        if not self.plans_dir.exists():
            return []
        plans = [self.read(p) for p in sorted(self.plans_dir.glob("*.json"))]
        return [p for p in plans if p is not None]

    def find(self, key_prefix: str) -> Plan:
        """The plan whose key starts with ``key_prefix`` (as ``plans list`` shows it)."""
        if not KEY_PREFIX_PATTERN.fullmatch(key_prefix):
            raise AutocpuError(
                f"{key_prefix!r:.60} is not a plan key or key prefix (hex digits)",
                "run 'autocpu plans list' and pass a key it shows",
            )
        matches = sorted(self.plans_dir.glob(f"{key_prefix}*.json"))
        if len(matches) != 1:
            problem = "no plan" if not matches else f"{len(matches)} plans"
            raise AutocpuError(
                f"{problem} matching {key_prefix!r} in {self.plans_dir}",
                "run 'autocpu plans list' and pass a longer unique key prefix",
            )
        plan = self.read(matches[0])
        if plan is None:
            raise AutocpuError(
                f"plan {matches[0].name} was corrupt and was moved aside",
                "re-run the tune that made it",
            )
        return plan

    def remove(self, key: str) -> Path:
        path = self.path(key)
        with writing(self.root), self._lock(path):
            path.unlink()
            self.canary_path(key).unlink(missing_ok=True)
        return path


@contextlib.contextmanager
def writing(folder: Path) -> Iterator[None]:
    """Report a failed write under ``folder`` (read-only, full disk) as one line with the fix."""
    try:
        yield
    except OSError as error:
        raise AutocpuError(
            f"cannot write to the autocpu cache {folder} ({one_line(error, 120)})",
            f"free space there, or set {CACHE_DIR_ENV} (or cache_dir=) to a writable folder",
        ) from None


def ensure_writable(folder: Path) -> None:
    """Fail now, in one line, if files cannot be written under ``folder``: a tune writes its
    exports, study and plan there, and a write failing mid-search would lose its trials."""
    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-check-{secrets.token_hex(4)}"
        probe.write_bytes(b"ok")
        probe.unlink()


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target.

    The temp file is created like ``open()`` would (0o666 less the umask), not 0600 as
    ``mkstemp`` does: a plan cache on a team volume, an exported bundle or a report must stay
    readable by whoever could read a plainly written file there.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_stale_temps(path: Path) -> None:
    """Remove temp files of earlier writes of ``path`` that a killed process left behind. A
    write in progress keeps its temp file for seconds; one older than STALE_TEMP_S is dead."""
    now = time.time()
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > STALE_TEMP_S:
                tmp.unlink()


def move_aside(path: Path, cache_root: Path, what: str, error: BaseException) -> Path | None:
    """Move a corrupt cache file to ``<cache>/corrupt/`` (never delete it) and say so in one
    warning the user sees. Where the cache is read-only the file stays, and the warning says
    that instead. Returns where the file went."""
    target: Path | None = cache_root / "corrupt" / f"{path.stem}.{time.time_ns()}{path.suffix}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        where = f"moved to {target}"
    except FileNotFoundError:  # another process moved it first
        return None
    except OSError as problem:
        target, where = None, f"left in place ({one_line(problem, 80)})"
    message = f"corrupt {what} {path} ({one_line(error, 120)}): {where}"
    log.warning(message)
    warnings.warn(message, AutocpuWarning, stacklevel=2)
    return target


def load_plan(source: Plan | str | Path, cache_dir: str | Path | None = None) -> Plan:
    """A Plan object, a path to a plan JSON file, or a cached plan's key (prefix)."""
    if isinstance(source, Plan):
        return source
    path = Path(source)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise AutocpuError(f"no plan file at {path}", "pass a path written by autocpu")
        try:
            return Plan.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError) as error:
            raise AutocpuError(
                f"{path} is not a valid plan ({error})",
                "re-export it with 'autocpu plans show KEY --json'",
            ) from None
    return PlanCache(Path(cache_dir) if cache_dir else None).find(str(source))
