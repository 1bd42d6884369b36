"""The small interface every backend implements, and the runner it returns.

A backend answers four questions: can it run here (``availability``), what is worth trying
(``defaults`` and ``suggest``, define-by-run on an Optuna trial), how to build a candidate
(``build``: the expensive part, cached across trials that differ only in runtime knobs), and how
to bind runtime knobs such as threads to a built candidate (``bind``).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import shutil
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from autocpu.errors import AutocpuError

if TYPE_CHECKING:
    import optuna

    from autocpu.hardware import CpuInfo
    from autocpu.models import ModelSpec


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here and, if not, why and what fixes it."""

    ok: bool
    reason: str = ""
    fix: str = ""

    @classmethod
    def yes(cls) -> Availability:
        return cls(True)

    @classmethod
    def no(cls, reason: str, fix: str = "") -> Availability:
        return cls(False, reason, fix)

    def check(self) -> None:
        """Raise the reason and fix when not ok: builds call it, since a plan applied in another
        environment reaches build() without the search's eligibility check."""
        if not self.ok:
            raise AutocpuError(self.reason, self.fix or "use another backend")


@dataclass
class BuildContext:
    """What a build may use besides the model: the hardware, sample inputs and a cache folder."""

    hw: CpuInfo
    example_inputs: list[dict[str, Any]]
    artifact_dir: Path
    #: The generation workload's new tokens per prompt (None for other workloads): builds that
    #: size buffers by length, such as a static KV cache, size them for it.
    max_new_tokens: int | None = None


class Runner:
    """A built candidate, callable exactly like the model (same kwargs, same output type).

    ``threads`` is applied before each call, only when it differs from torch's current setting,
    so a tuned model keeps its thread count even if other code changes torch's. A candidate
    that generates (an engine with a KV cache) serves :meth:`generate` on the same engine.
    """

    def __init__(
        self, fn: Callable[..., Any], *, threads: int | None = None, fixed_outputs: bool = False
    ) -> None:
        self.fn = fn
        self.threads = threads
        #: True for an exported graph: it takes the graph's inputs only and returns its fixed
        #: outputs, so call options such as ``labels`` or ``output_hidden_states`` (see
        #: :data:`autocpu.outputs.CALL_OPTIONS`) would be ignored, not honoured.
        self.fixed_outputs = fixed_outputs

    def _use_threads(self) -> None:
        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    def __call__(self, **inputs: Any) -> Any:
        self._use_threads()
        with torch.inference_mode():
            return self.fn(**inputs)

    @property
    def can_generate(self) -> bool:
        return callable(getattr(self.fn, "generate", None))

    @property
    def generation_config(self) -> Any:
        return getattr(self.fn, "generation_config", None)

    @property
    def config(self) -> Any:
        """The model's config (the workloads read ``is_encoder_decoder`` from it)."""
        return getattr(self.fn, "config", None)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``generate()`` on this candidate's engine (transformers' arguments, its output)."""
        if not self.can_generate:
            raise AutocpuError(
                f"this candidate ({type(self.fn).__name__}) cannot generate",
                "tune with workload='generate' to get a plan that serves generate()",
            )
        self._use_threads()
        with torch.inference_mode():
            return self.fn.generate(*args, **kwargs)


class Backend(ABC):
    """Base class of every backend; subclasses live one per file in ``autocpu/backends``."""

    #: Registry name, also the Optuna parameter prefix.
    name: ClassVar[str]
    #: One line for ``autocpu probe`` and explanations.
    description: ClassVar[str]
    #: Lower is simpler; ties within measurement noise go to the simplest backend.
    simplicity: ClassVar[int] = 5
    #: Parameters applied by :meth:`bind`; changing only these reuses the built candidate.
    runtime_params: ClassVar[frozenset[str]] = frozenset({"threads"})
    #: Distributions whose presence this backend needs, for availability messages.
    requires: ClassVar[tuple[str, ...]] = ()
    #: The pip extra that installs what this backend needs.
    extra: ClassVar[str | None] = None
    #: Why this backend cannot serve the generation workload; empty when it can.
    cannot_generate: ClassVar[str] = ""
    #: Why a generation tune tries this backend only when it is asked for by name (a cost far
    #: above its measured gain); empty when it is tried by default.
    generation_opt_in: ClassVar[str] = ""

    @abstractmethod
    def availability(self, spec: ModelSpec | None, hw: CpuInfo) -> Availability:
        """Can this backend run here, for this model (``spec`` None: for any model)?"""

    def eligibility(self, spec: ModelSpec, hw: CpuInfo, *, named: bool) -> Availability:
        """Can this backend run here, for this model and the workload being tuned?
        ``named``: the user listed it in ``backends``."""
        if spec.workload == "generate" and self.cannot_generate:
            return Availability.no(self.cannot_generate, "another backend serves generation")
        if spec.workload == "generate" and self.generation_opt_in and not named:
            return Availability.no(self.generation_opt_in, f"pass backends=[..., {self.name!r}]")
        return self.availability(spec, hw)

    @abstractmethod
    def defaults(self, hw: CpuInfo) -> dict[str, Any]:
        """The settings a user following the backend's own docs would use; tried before TPE."""

    def lossy_defaults(self, spec: ModelSpec, hw: CpuInfo) -> list[dict[str, Any]]:
        """The usual bf16/int8 recipes, tried before every backend's defaults when the tolerance
        admits them (TPE may otherwise not draw them within a small budget)."""
        return []

    def int4_defaults(self, spec: ModelSpec, hw: CpuInfo) -> list[dict[str, Any]]:
        """The usual 4-bit weight recipes, tried first when the tolerance admits them."""
        return []

    @abstractmethod
    def suggest(
        self,
        trial: optuna.Trial,
        spec: ModelSpec,
        hw: CpuInfo,
        *,
        lossy: bool = True,
        int4: bool = False,
    ) -> dict[str, Any]:
        """Sample settings for this model on ``trial`` (names via :meth:`key`), unprefixed.

        ``lossy=False``: the tolerance rules out bf16 and int8, so do not offer them.
        ``int4=True``: it admits 4-bit weights too (``Tolerance.admits_int4``): offer them.
        """

    @abstractmethod
    def build(self, spec: ModelSpec, params: Mapping[str, Any], ctx: BuildContext) -> Any:
        """Build the expensive part of a candidate from its non-runtime parameters."""

    def bind(self, built: Any, params: Mapping[str, Any]) -> Runner:
        """Apply runtime parameters to a built candidate."""
        return Runner(built, threads=params.get("threads"))

    # Helpers shared by all backends ---------------------------------------------------------

    def key(self, param: str) -> str:
        """Optuna parameter name: prefixed so backends never share a distribution."""
        return f"{self.name}.{param}"

    def build_key(self, params: Mapping[str, Any]) -> tuple:
        """Identity of the built artifact: the parameters that are not runtime knobs."""
        return (
            self.name,
            *sorted((k, v) for k, v in params.items() if k not in self.runtime_params),
        )

    def suggest_threads(self, trial: optuna.Trial, hw: CpuInfo) -> int:
        return trial.suggest_int(self.key("threads"), 1, max(hw.usable_cpus, 1))

    def missing_packages(self) -> Availability | None:
        """An Availability naming the first missing distribution, or None when all are there."""
        for dist in self.requires:
            try:
                importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                fix = (
                    f"pip install 'autocpu[{self.extra}]'" if self.extra else f"pip install {dist}"
                )
                return Availability.no(f"{dist} is not installed", fix)
        return None


@contextlib.contextmanager
def quiet_build_logs() -> Iterator[None]:
    """Silence log records up to WARNING and tracer warnings while building a candidate.

    The stacks backends drive chatter at build time ("consider pre-processing before
    quantization", "could not infer whether the model was already converted"), some through
    loggers created mid-build with levels of their own, so the switch is process-wide and
    temporary rather than per logger.
    """
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logging.disable(previous)


def have_cxx_compiler() -> bool:
    """torch.compile (Inductor) on CPU generates C++ and needs a compiler on PATH."""
    return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))
