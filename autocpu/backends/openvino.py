"""OpenVINO through optimum-intel: export to IR once, optional int8 weights, tuned compile config.

Two facts shape this backend:

* OpenVINO runs in **bf16 by default** on CPUs with AVX512-BF16 or AMX, which changes numerics.
  Every candidate therefore sets ``INFERENCE_PRECISION_HINT`` explicitly, and :meth:`bind` reads
  the precision back from the compiled model and refuses a mismatch.
* The exporter silently int8-compresses models with >= 1B parameters when nncf is installed.
  The export passes an explicit fp32 ``OVConfig`` (no quantization config), so the fp32 variant
  is really fp32; int8 weights are a separate, explicit build parameter.

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
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from autocpu.backends import _optimum_common as common
from autocpu.backends.base import BuildContext, Runner, quiet_build_logs
from autocpu.errors import AutocpuError

if TYPE_CHECKING:
    import optuna

    from autocpu.hardware import CpuInfo
    from autocpu.models import ModelSpec

HINTS = ("LATENCY", "THROUGHPUT")
WEIGHTS = ("fp32", "int8")
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

    def suggest(
        self, trial: optuna.Trial, spec: ModelSpec, hw: CpuInfo, *, lossy: bool = True
    ) -> dict[str, Any]:
        """Define-by-run: bf16 only with native bf16, int8 only with nncf, streams by hint.

        One call runs one request, which uses one stream: more streams only split the threads,
        so streams are searched under the THROUGHPUT hint only (LATENCY means one stream).
        """
        weights = list(WEIGHTS) if nncf_installed() and lossy else ["fp32"]
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
        if spec.workload == "generate":
            params.update(self._suggest_generation(trial, params["weights"], lossy=lossy))
        return params

    def _suggest_generation(self, trial: optuna.Trial, weights: str, *, lossy: bool) -> dict:
        """The KV cache's precision (f32 only when lossy candidates are ruled out), and the
        activation quantization of int8 weights."""
        kv_choices = list(KV_CACHE_PRECISIONS) if lossy else ["f32"]
        found: dict[str, Any] = {
            "kv_cache": trial.suggest_categorical(self.key("kv_cache"), kv_choices)
        }
        if weights == "int8":
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
        common.ensure_variant(
            folder, lambda tmp: _export(spec, ctx, task, tmp), backend=self.name, task=task
        )
        weights = params.get("weights", "fp32")
        if weights not in WEIGHTS:
            raise AutocpuError(f"unknown weights={weights!r}", "use 'fp32' or 'int8'")
        if weights == "int8":
            if not nncf_installed():
                raise AutocpuError("int8 weights need nncf", "pip install 'autocpu[nncf]'")
            source, folder = folder, root / "int8"
            common.ensure_variant(folder, lambda tmp: _compress(source, tmp), backend=self.name)
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


def _compress(source: Path, target: Path) -> None:
    """nncf int8 (asymmetric) weight compression of every IR in the fp32 export."""
    import nncf
    import openvino as ov

    core = ov.Core()
    for xml in sorted(source.glob("*.xml")):
        model = core.read_model(xml)
        compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        ov.save_model(compressed, target / xml.name, compress_to_fp16=False)
    common.copy_side_files(source, target)


if __name__ == "__main__":  # the export child: SOURCE MODEL_TASK EXPORT_TASK TARGET
    export_here(*sys.argv[1:5])
