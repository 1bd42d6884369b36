"""OpenVINO through optimum-intel: export to IR once, optional int8 / int4 weights (nncf), tuned
compile config.

Two facts shape this backend:

* OpenVINO runs in **bf16 by default** on CPUs with AVX512-BF16 or AMX, which changes numerics.
  Every candidate therefore sets ``INFERENCE_PRECISION_HINT`` explicitly, and :meth:`bind` reads
  the precision back from the compiled model and refuses a mismatch.
* The exporter silently int8-compresses models with >= 1B parameters when nncf is installed.
  The export passes an explicit fp32 ``OVConfig`` (no quantization config), so the fp32 variant
  is really fp32; int8 and int4 weights are separate, explicit build parameters, each variant
  compressed once from the fp32 IR and kept. 4-bit weights are offered for a decoder-only
  model's generation only, where every new token reads every weight, and only under a
  tolerance that admits them (``Tolerance.admits_int4``).

Text generation is exported with its KV cache as a stateful model (optimum-intel's default), so
``generate()`` works on the runner's model; a plain forward gives the same logits as torch.
OpenVINO keeps that cache in f16 even at f32 inference precision, so generation candidates set
``KV_CACHE_PRECISION`` too (f32 for an fp32-faithful one; f16 or u8 where the tolerance admits
them), and with int8 weights ``DYNAMIC_QUANTIZATION_GROUP_SIZE`` (0: activations stay float;
OpenVINO's default quantizes them per group of 32).
Nothing heavy is imported at module level.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from autocpu.backends import _artifacts as artifacts
from autocpu.backends import _optimum_common as common
from autocpu.backends.base import BuildContext, Runner, quiet_build_logs
from autocpu.errors import AutocpuError

if TYPE_CHECKING:
    import optuna

    from autocpu.hardware import CpuInfo
    from autocpu.models import ModelSpec

HINTS = ("LATENCY", "THROUGHPUT")
WEIGHTS = ("fp32", "int8", "int4")
#: 4-bit weights: values per scale (nncf adjusts it down, to a power of two >= 32, for layers
#: whose width it does not divide, such as SmolLM2's 576), the share of layers in 4 bits (the
#: rest, picked by sensitivity, and always the embeddings and the head take the backup
#: precision), and what the layers kept out of 4 bits are stored in.
INT4_GROUP_SIZES = (32, 64, 128)
INT4_RATIOS = (0.8, 1.0)
INT4_BACKUPS = ("int8_asym", "none")
#: Data-aware 4-bit compression on the example prompts: AWQ rescales channels by their
#: activations, scale estimation fits each group's scale to the layer's outputs.
INT4_CALIBRATIONS = ("none", "awq", "scale", "awq+scale")
#: Precisions of the KV cache a generation candidate may keep (f32: fp32-faithful).
KV_CACHE_PRECISIONS = ("f32", "f16", "u8")
#: Activation quantization group sizes with int8 weights (0: off).
DYNAMIC_QUANTIZATION_GROUPS = (0, 32, 128)


def nncf_installed() -> bool:
    """int8 weight compression needs nncf (found without importing it: it is slow to import)."""
    return importlib.util.find_spec("nncf") is not None


class OpenVinoBackend(common.OptimumBackend):
    """OpenVINO CPU plugin on an optimum-intel IR export."""

    name: ClassVar[str] = "openvino"
    description: ClassVar[str] = (
        "OpenVINO via optimum-intel: IR export, optional int8 weights (nncf), tuned hint, "
        "precision, threads and streams"
    )
    exporter: ClassVar[str] = "openvino"
    model_module: ClassVar[str] = "optimum.intel"
    class_prefix: ClassVar[str] = "OVModelFor"
    extra: ClassVar[str | None] = "openvino"
    requires: ClassVar[tuple[str, ...]] = ("optimum-intel", "openvino")
    runtime_params: ClassVar[frozenset[str]] = frozenset(
        {"hint", "precision", "threads", "streams", "pinning", "kv_cache", "dq_group"}
    )
    #: Versions that shape the exported files (folder name hash).
    artifact_dists: ClassVar[tuple[str, ...]] = (
        "optimum-intel",
        "openvino",
        "nncf",
        "optimum",
        "torch",
        "transformers",
    )

    # Search space -----------------------------------------------------------------------------

    def defaults(self, hw: CpuInfo) -> dict[str, Any]:
        """optimum-intel's settings, except precision: f32, not the bf16 OpenVINO picks on CPUs
        with native bf16 (and, for generation, an f32 KV cache: see :func:`ov_config`)."""
        return {
            "weights": "fp32",
            "hint": "LATENCY",
            "precision": "f32",
            "threads": max(hw.usable_cpus, 1),
            "streams": 1,
            "pinning": True,
        }

    def lossy_defaults(self, spec: ModelSpec, hw: CpuInfo) -> list[dict[str, Any]]:
        """bf16 inference (OpenVINO's own default on such CPUs), and int8 weights on top; for
        generation with OpenVINO's own KV cache (f16) and activation quantization (32)."""
        precision = "bf16" if hw.native_bf16 else "f32"
        generation = {"kv_cache": "f16"} if spec.workload == "generate" else {}
        base = {**self.defaults(hw), **generation}
        recipes = [{**base, "precision": "bf16"}] if hw.native_bf16 else []
        if nncf_installed():
            int8 = {"weights": "int8", "precision": precision}
            recipes.append({**base, **int8, **({"dq_group": 32} if generation else {})})
        return recipes

    def int4_defaults(self, spec: ModelSpec, hw: CpuInfo) -> list[dict[str, Any]]:
        """4-bit weights as optimum-intel's ``OVWeightQuantizationConfig(bits=4)`` makes them
        (asymmetric, groups of 128, every layer but the embeddings and the head), groups
        adjusted to layers 128 does not divide, then the same fitted to the example prompts
        (AWQ and scale estimation); activations quantized per group of 32 (OpenVINO's own
        default) and a u8 KV cache, the bytes a 4-bit tolerance can spare."""
        if not _compresses_to_int4(spec):
            return []
        precision = "bf16" if hw.native_bf16 else "f32"
        base = {**self.defaults(hw), **DEFAULT_INT4, "precision": precision, "kv_cache": "u8"}
        return [{**base, "dq_group": 32}, {**base, "dq_group": 32, "calibration": "awq+scale"}]

    def suggest(
        self,
        trial: optuna.Trial,
        spec: ModelSpec,
        hw: CpuInfo,
        *,
        lossy: bool = True,
        int4: bool = False,
    ) -> dict[str, Any]:
        """Define-by-run: bf16 only with native bf16, int8 only with nncf, int4 only for
        generation under a tolerance that admits it, streams by hint.

        One call runs one request, which uses one stream: more streams only split the threads,
        so streams are searched under the THROUGHPUT hint only (LATENCY means one stream).
        """
        weights = ["fp32"]
        if nncf_installed() and lossy:
            weights = list(WEIGHTS) if int4 and _compresses_to_int4(spec) else ["fp32", "int8"]
        precisions = ["f32", "bf16"] if hw.native_bf16 and lossy else ["f32"]
        params: dict[str, Any] = {
            "weights": trial.suggest_categorical(self.key("weights"), weights),
            "hint": trial.suggest_categorical(self.key("hint"), list(HINTS)),
            "precision": trial.suggest_categorical(self.key("precision"), precisions),
            "threads": self.suggest_threads(trial, hw),
        }
        params["streams"] = (
            trial.suggest_int(self.key("streams"), 1, max(hw.usable_cpus, 1))
            if params["hint"] == "THROUGHPUT"
            else 1
        )
        params["pinning"] = trial.suggest_categorical(self.key("pinning"), [True, False])
        if params["weights"] == "int4":
            params.update(self._suggest_int4(trial))
        if spec.workload == "generate":
            params.update(self._suggest_generation(trial, params["weights"], lossy=lossy))
        return params

    def _suggest_int4(self, trial: optuna.Trial) -> dict[str, Any]:
        return {
            "group_size": trial.suggest_categorical(self.key("group_size"), list(INT4_GROUP_SIZES)),
            "ratio": trial.suggest_categorical(self.key("ratio"), list(INT4_RATIOS)),
            "symmetric": trial.suggest_categorical(self.key("symmetric"), [False, True]),
            "backup": trial.suggest_categorical(self.key("backup"), list(INT4_BACKUPS)),
            "calibration": trial.suggest_categorical(
                self.key("calibration"), list(INT4_CALIBRATIONS)
            ),
        }

    def _suggest_generation(self, trial: optuna.Trial, weights: str, *, lossy: bool) -> dict:
        """The KV cache's precision (f32 only when lossy candidates are ruled out), and the
        activation quantization of int8 weights."""
        kv_choices = list(KV_CACHE_PRECISIONS) if lossy else ["f32"]
        found: dict[str, Any] = {
            "kv_cache": trial.suggest_categorical(self.key("kv_cache"), kv_choices)
        }
        if weights in ("int8", "int4"):
            found["dq_group"] = trial.suggest_categorical(
                self.key("dq_group"), list(DYNAMIC_QUANTIZATION_GROUPS)
            )
        return found

    # Build: export once, derive int8 ----------------------------------------------------------

    def build(
        self, spec: ModelSpec, params: Mapping[str, Any], ctx: BuildContext
    ) -> common.ExportedVariant:
        """The IR folder for the build params, exporting or compressing only what is missing."""
        task = common.export_task("openvino", spec.model_type, spec.task)
        root = common.model_root(ctx, "openvino", spec, self.artifact_dists, task)
        folder = root / "fp32"
        artifacts.ensure_variant(
            folder, lambda tmp: _export(spec, ctx, task, tmp), backend=self.name, task=task
        )
        weights = params.get("weights", "fp32")
        if weights not in WEIGHTS:
            raise AutocpuError(f"unknown weights={weights!r}", "use 'fp32', 'int8' or 'int4'")
        if weights != "fp32":
            if not nncf_installed():
                raise AutocpuError(f"{weights} weights need nncf", "pip install 'autocpu[nncf]'")
            compression = WeightCompression.of(params)
            source, folder = folder, root / compression.folder_name
            artifacts.ensure_variant(
                folder,
                lambda tmp: compression.apply(source, tmp, self.task_class(spec.task), ctx),
                backend=self.name,
                weights=compression.to_dict(),
            )
        return common.ExportedVariant(
            folder,
            spec.task,
            with_past=task.endswith("-with-past"),
            extra_outputs=common.extra_outputs(spec),
        )

    # Bind: compile with the runtime params ----------------------------------------------------

    def bind(self, built: common.ExportedVariant, params: Mapping[str, Any]) -> Runner:
        """Compile the IR with ``ov_config`` and check the precision OpenVINO really chose."""
        common.check_built(built)
        cls = self.task_class(built.task)
        # A local folder: no hub access. (local_files_only=True would make optimum-intel look
        # for the folder in the hub cache and log a spurious "Could not infer" warning.)
        model = cls.from_pretrained(
            str(built.path), export=False, ov_config=ov_config(params), device="CPU", compile=True
        )
        wanted = params.get("precision", "f32")
        actual = compiled_precision(model)
        if actual != wanted:
            raise AutocpuError(
                f"OpenVINO compiled in {actual} although {wanted} was asked for",
                "report this; do not trust this candidate's accuracy",
            )
        model = common.TorchLikeModel(model, _run_compiled if built.extra_outputs else None)
        # threads live in the compiled model, not in torch
        return Runner(model, threads=None, fixed_outputs=True)


def ov_config(params: Mapping[str, Any]) -> dict[str, str]:
    """The compile config (string values, as optimum-intel passes them to OpenVINO).

    Precision is always set: left out, OpenVINO picks bf16 on CPUs that have it.
    """
    config = {
        "PERFORMANCE_HINT": str(params.get("hint", "LATENCY")),
        "INFERENCE_PRECISION_HINT": str(params.get("precision", "f32")),
        "ENABLE_CPU_PINNING": "YES" if params.get("pinning", True) else "NO",
    }
    if params.get("threads"):
        config["INFERENCE_NUM_THREADS"] = str(int(params["threads"]))
    if params.get("streams"):
        config["NUM_STREAMS"] = str(int(params["streams"]))
    if params.get("kv_cache"):
        config["KV_CACHE_PRECISION"] = str(params["kv_cache"])
    if params.get("dq_group") is not None:
        config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = str(int(params["dq_group"]))
    return config


def compiled_precision(model: Any) -> str:
    """``INFERENCE_PRECISION_HINT`` of the compiled model, as "f32" / "bf16" / "f16"; an
    encoder-decoder's parts each report theirs, and any that differs from the first wins."""
    parts = [getattr(model, name, None) for name in ("encoder", "decoder")]
    requests = [p.request for p in parts if p is not None and hasattr(p, "request")]
    found = {_request_precision(r) for r in requests or [model.request]}
    return sorted(found)[0] if len(found) == 1 else "mixed " + "/".join(sorted(found))


def _request_precision(request: Any) -> str:
    compiled = request.get_compiled_model() if hasattr(request, "get_compiled_model") else request
    return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()


def _run_compiled(model: Any, feed: dict[str, Any]) -> dict[str, Any]:
    """Every output of the compiled model (the OVModel's ``forward`` returns only some)."""
    import torch

    result = model.request({k: v.numpy(force=True) for k, v in feed.items()})
    return {name: torch.from_numpy(result[index]) for name, index in model.output_names.items()}


def _export(spec: ModelSpec, ctx: BuildContext, task: str, target: Path) -> None:
    """Export in a child process: OpenVINO's PyTorch frontend leaves the exporting process's
    TorchScript runtime broken (a frozen trace called after an export segfaults), and
    the user's process may hold such graphs, or try the TorchScript backend next."""
    source = spec.saved_copy(ctx.artifact_dir)
    command = [sys.executable, "-m", __name__, str(source), spec.task, task, str(target)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        raise RuntimeError(f"OpenVINO export failed: {lines[-1][:300]}")


def export_here(source: str, model_task: str, task: str, target: str) -> None:
    """optimum-intel export, explicitly fp32: no size-based int8 compression behind our back."""
    from optimum.exporters.openvino import main_export
    from optimum.intel.openvino.configuration import OVConfig

    from autocpu.models import load_model_dir, make_spec

    spec = make_spec(load_model_dir(source, model_task), model_task)
    with quiet_build_logs():
        main_export(
            source,
            output=target,
            task=task,
            library_name="transformers",
            local_files_only=True,
            ov_config=OVConfig(dtype="fp32"),
            pad_token_id=common.pad_token_for_export(spec),
            custom_export_configs=common.custom_export_configs(
                "openvino", spec, task, common.extra_outputs(spec)
            ),
        )


#: The 4-bit recipe tried first: optimum-intel's ``OVWeightQuantizationConfig(bits=4)``.
DEFAULT_INT4 = {
    "weights": "int4",
    "group_size": 128,
    "ratio": 1.0,
    "symmetric": False,
    "backup": "int8_asym",
    "calibration": "none",
}


def _compresses_to_int4(spec: ModelSpec) -> bool:
    """4-bit weights pay where weights are read once per token: a decoder-only model's
    ``generate()`` (one IR, calibrated through its stateful request)."""
    return spec.workload == "generate" and not spec.is_seq2seq


@dataclass(frozen=True)
class WeightCompression:
    """One nncf weight compression of an fp32 IR: int8 per channel, or int4 group-wise."""

    bits: int
    group_size: int = 128
    ratio: float = 1.0
    symmetric: bool = False
    backup: str = "int8_asym"
    calibration: str = "none"

    @classmethod
    def of(cls, params: Mapping[str, Any]) -> WeightCompression:
        """The compression the build params ask for (int4 settings default as optimum's)."""
        if params.get("weights") == "int8":
            return cls(bits=8)
        found = {k: params.get(k, v) for k, v in DEFAULT_INT4.items() if k != "weights"}
        problems = [
            f"{name}={found[name]!r}"
            for name, choices in (
                ("group_size", INT4_GROUP_SIZES),
                ("ratio", INT4_RATIOS),
                ("backup", INT4_BACKUPS),
                ("calibration", INT4_CALIBRATIONS),
            )
            if found[name] not in choices
        ]
        if problems:
            raise AutocpuError(
                f"unknown int4 setting {', '.join(problems)}",
                f"use group_size in {INT4_GROUP_SIZES}, ratio in {INT4_RATIOS}, backup in "
                f"{INT4_BACKUPS}, calibration in {INT4_CALIBRATIONS}",
            )
        return cls(bits=4, **found)

    @property
    def folder_name(self) -> str:
        if self.bits == 8:
            return "int8"
        kind = "sym" if self.symmetric else "asym"
        return (
            f"int4-g{self.group_size}-r{self.ratio:g}-{kind}-{self.backup}-"
            f"{self.calibration.replace('+', '-')}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def apply(self, source: Path, target: Path, task_class: Any, ctx: BuildContext) -> None:
        """Compress every IR of ``source`` into ``target`` (a data-aware int4 one with the
        example prompts as its calibration set, fed as the stateful model takes a prompt)."""
        import nncf
        import openvino as ov

        core = ov.Core()
        dataset = self._calibration_set(source, task_class, ctx)
        for xml in sorted(source.glob("*.xml")):
            model = core.read_model(xml)
            with quiet_build_logs():
                compressed = nncf.compress_weights(model, **self._options(nncf, dataset))
            ov.save_model(compressed, target / xml.name, compress_to_fp16=False)
        common.copy_side_files(source, target)

    def _options(self, nncf: Any, dataset: Any) -> dict[str, Any]:
        if self.bits == 8:
            return {"mode": nncf.CompressWeightsMode.INT8_ASYM}
        from nncf.quantization.advanced_parameters import (
            AdvancedCompressionParameters,
            GroupSizeFallbackMode,
        )

        modes = nncf.CompressWeightsMode
        return {
            "mode": modes.INT4_SYM if self.symmetric else modes.INT4_ASYM,
            "group_size": self.group_size,
            "ratio": self.ratio,
            "backup_mode": nncf.BackupMode(self.backup),
            "dataset": dataset,
            "awq": "awq" in self.calibration,
            "scale_estimation": "scale" in self.calibration,
            "advanced_parameters": AdvancedCompressionParameters(
                group_size_fallback_mode=GroupSizeFallbackMode.ADJUST
            ),
        }

    def _calibration_set(self, source: Path, task_class: Any, ctx: BuildContext) -> Any:
        """The example prompts as the stateful IR's inputs (None: data-free)."""
        if self.bits == 8 or self.calibration == "none":
            return None
        import nncf

        model = task_class.from_pretrained(str(source), export=False, compile=False, device="CPU")
        prompts = [
            {k: v for k, v in b.items() if k in ("input_ids", "attention_mask")}
            for b in ctx.example_inputs
        ]
        return nncf.Dataset([model.prepare_inputs(**prompt) for prompt in prompts])


if __name__ == "__main__":  # the export child: SOURCE MODEL_TASK EXPORT_TASK TARGET
    export_here(*sys.argv[1:5])
