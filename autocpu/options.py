"""Every option of ``tune()``: its default, its validation and its CLI flag, defined once.

``tune()`` builds a :class:`TuneOptions` from its keywords; ``autocpu tune`` derives its flags
(names, defaults, help) from the fields' metadata, so a default lives in one place.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autocpu.errors import AutocpuError
from autocpu.tasks import GENERATION_TASKS, task_names

if TYPE_CHECKING:
    from autocpu.accuracy import Tolerance

#: The budget when neither ``n_trials`` nor ``timeout`` is given (a sampled search).
DEFAULT_TRIALS = 20
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_TRIAL_TIMEOUT_S = 900.0
#: How the study picks candidates: Optuna's TPE within a budget, or every point of the space
#: (Optuna's BruteForceSampler: the benchmark's oracle, and for users who can afford it).
SEARCH_STRATEGIES = ("tpe", "exhaustive")
#: Where trials run: a fresh worker process each (protected), or the caller's process (faster).
ISOLATION_MODES = ("process", "none")
#: How long ``bench()`` and ``autocpu bench`` alternate a plan and fp32 eager.
BENCH_SECONDS = 20.0
#: What a tune measures: one forward pass per example batch, or greedy generate() from each
#: (the default for text-generation models; see autocpu.workloads).
WORKLOAD_NAMES = ("forward", "generate")
#: New tokens per prompt the generation workload generates.
DEFAULT_MAX_NEW_TOKENS = 64
#: The inputs made when none are given (``tune(model)``, the CLI): one row of a typical length.
DEFAULT_BATCH_SIZE = 1
DEFAULT_SEQ_LEN = 128


_FIXES = {
    "timeout": "pass the study's time budget in seconds > 0",
    "trial_timeout": "pass seconds > 0 per trial",
    "memory_limit_gb": "pass a limit in GiB > 0, or None for 80% of this machine's memory",
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive(value: Any) -> bool:
    """A finite number above 0 (not a bool, not a numeric string, not NaN)."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return is_number and math.isfinite(value) and value > 0


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _flag(help: str, **argparse_kwargs: Any) -> dict[str, Any]:
    """Field metadata: the option is an ``autocpu tune`` flag with this help."""
    return {"cli": {"help": help, **argparse_kwargs}}


@dataclass(frozen=True)
class TuneOptions:
    """How to tune: accuracy, budget, where trials run and where results are kept.

    ``tolerance`` accepts a :class:`Tolerance`, a preset name, a dict of its fields or a number
    (a max relative difference); it is stored parsed.
    """

    tolerance: Tolerance = field(
        default="strict",
        metadata=_flag(
            "strict, bf16, int8, int4 (generation), or a max relative difference such as 0.01"
        ),
    )
    n_trials: int | None = field(
        default=None,
        metadata=_flag(
            f"trial budget (default {DEFAULT_TRIALS})", flag="--trials", type=int, metavar="N"
        ),
    )
    timeout: float | None = field(
        default=None, metadata=_flag("time budget in seconds", type=float)
    )
    search: str = field(
        default="tpe",
        metadata=_flag(
            "tpe: a budgeted sample (default); exhaustive: every point of the space (slow)",
            choices=SEARCH_STRATEGIES,
        ),
    )
    backends: list[str] | None = field(
        default=None,
        metadata=_flag("comma-separated subset, e.g. eager,torchscript", type=_comma_list),
    )
    cache: bool = field(
        default=True,
        metadata=_flag(
            "ignore and do not write cached plans", flag="--no-cache", action="store_false"
        ),
    )
    cache_dir: str | Path | None = field(
        default=None, metadata=_flag("default: $AUTOCPU_CACHE_DIR or user cache")
    )
    task: str | None = field(
        default=None,
        metadata=_flag(
            "e.g. feature-extraction, text-classification (default: from config.architectures)"
        ),
    )
    workload: str | None = field(
        default=None,
        metadata=_flag(
            "forward: one forward pass per batch; generate: greedy generate() (default for "
            "text-generation models)",
            choices=WORKLOAD_NAMES,
        ),
    )
    max_new_tokens: int = field(
        default=DEFAULT_MAX_NEW_TOKENS,
        metadata=_flag(
            "new tokens per prompt the generation workload generates (EOS ignored)",
            type=int,
            metavar="N",
        ),
    )
    isolation: str = field(
        default="process",
        metadata=_flag(
            "time each trial and engine in a worker process of its own (default) or in this one "
            "(biased: runtimes sharing a process disturb each other)",
            choices=ISOLATION_MODES,
        ),
    )
    storage: str | None = field(
        default=None,
        metadata=_flag(
            "Optuna storage URL for the study, e.g. postgresql://user:pw@host/db "
            "(default: a journal file in the cache; an interrupted tune resumes)"
        ),
    )
    trial_timeout: float = field(
        default=DEFAULT_TRIAL_TIMEOUT_S, metadata=_flag("seconds per trial", type=float)
    )
    memory_limit_gb: float | None = field(
        default=None, metadata=_flag("per trial (default: 80%% of RAM)", type=float)
    )
    #: Called when each trial starts and ends (the CLI draws its progress bar with it).
    progress: Callable[[Any], None] | None = None

    def __post_init__(self) -> None:
        from autocpu.accuracy import Tolerance  # torch: loaded when a tune starts, not for --help

        object.__setattr__(self, "tolerance", Tolerance.parse(self.tolerance))
        problems = self._problems()
        if problems:
            raise AutocpuError(*problems[0])

    def _problems(self) -> list[tuple[str, str]]:
        found = []
        if self.n_trials is not None and not (_is_int(self.n_trials) and self.n_trials >= 1):
            found.append((f"n_trials={self.n_trials!r} is not a whole number >= 1", "pass e.g. 20"))
        for name in ("timeout", "trial_timeout", "memory_limit_gb"):
            value = getattr(self, name)
            if value is not None and not _is_positive(value):
                found.append((f"{name}={value!r} is not a positive number", _FIXES[name]))
        if not (_is_int(self.max_new_tokens) and self.max_new_tokens >= 1):
            found.append(
                (
                    f"max_new_tokens={self.max_new_tokens!r} is not a whole number >= 1",
                    "pass e.g. 64",
                )
            )
        if self.workload is not None and self.workload not in WORKLOAD_NAMES:
            found.append(
                (
                    f"workload={self.workload!r} is not known",
                    "use 'generate' (greedy generate()) or 'forward' (one forward pass)",
                )
            )
        if self.isolation not in ISOLATION_MODES:
            found.append(
                (
                    f"isolation={self.isolation!r} is not known",
                    "use 'process' (worker processes) or 'none' (in this process)",
                )
            )
        if self.search not in SEARCH_STRATEGIES:
            found.append(
                (
                    f"search={self.search!r} is not known",
                    "use 'tpe' (a budgeted sample) or 'exhaustive' (every point of the space)",
                )
            )
        if self.task is not None and self.task not in task_names():
            found.append((f"unknown task {self.task!r}", f"use one of: {', '.join(task_names())}"))
        if self.backends is not None and (
            isinstance(self.backends, str)
            or not isinstance(self.backends, (list, tuple))
            or not self.backends
        ):
            found.append(
                (
                    f"backends must be a non-empty list of names, got {self.backends!r}",
                    "pass e.g. backends=['eager', 'torchscript'] ('autocpu probe' lists them)",
                )
            )
        return found

    def workload_for(self, task: str) -> str:
        """The workload to tune: as given, else generation for models that generate text."""
        if self.workload is not None:
            return self.workload
        return "generate" if task in GENERATION_TASKS else "forward"

    @property
    def budget(self) -> tuple[int | None, float | None]:
        """``(n_trials, timeout)``: as given, or the defaults when a sampled search got none
        (an exhaustive one then runs until the space is measured)."""
        if self.n_trials is None and self.timeout is None and self.search != "exhaustive":
            return DEFAULT_TRIALS, DEFAULT_TIMEOUT_S
        return self.n_trials, self.timeout


def add_cli_flags(parser: argparse.ArgumentParser, only: Collection[str] | None = None) -> None:
    """One ``--flag`` per option with CLI metadata (those named in ``only``, when given), its
    default taken from the field."""
    for option in fields(TuneOptions):
        if "cli" not in option.metadata or (only is not None and option.name not in only):
            continue
        spec = dict(option.metadata["cli"])
        flag = spec.pop("flag", "--" + option.name.replace("_", "-"))
        if spec.get("action") is None:
            spec["default"] = option.default
        parser.add_argument(flag, dest=option.name, **spec)


def from_cli(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """The ``tune()`` keywords the parsed flags give."""
    return {
        f.name: getattr(args, f.name) for f in fields(TuneOptions) if "cli" in f.metadata
    } | extra
