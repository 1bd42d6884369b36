"""ONNX Runtime through optimum-onnx: export once, then fusions, dynamic int8 and session knobs.

The export is the expensive part (seconds to minutes), so it happens once per model and versions
and is kept on disk; fused and int8 variants are derived from it, also once. Everything a session
decides (threads, graph optimization level, execution mode, spinning) is a runtime parameter:
trials that differ only in those reuse the files and just create a new session.

Text generation is exported *with* its KV cache (``text-generation-with-past``) when the exporter
supports it, so ``generate()`` on the runner's model reuses past keys and values like the torch
model does; a plain forward (no ``past_key_values``) gives the same logits as torch. Generation
candidates also choose whether optimum binds the past keys and values to the session's outputs
(IO binding) instead of copying them through numpy each step.

Nothing heavy is imported at module level: onnxruntime and optimum load inside the methods.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from autocpu.backends import _optimum_common as common
from autocpu.backends.base import BuildContext, Runner
from autocpu.errors import AutocpuError
from autocpu.tasks import GENERATION_TASKS

if TYPE_CHECKING:
    import onnxruntime
    import optuna

    from autocpu.hardware import CpuInfo
    from autocpu.models import ModelSpec

#: Our names for ``onnxruntime.GraphOptimizationLevel`` members.
OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
EXECUTION_MODES = {"sequential": "ORT_SEQUENTIAL", "parallel": "ORT_PARALLEL"}
QUANTIZE_CHOICES = ("none", "int8")

#: Above this size an ONNX file must keep its weights in external data (protobuf's 2 GiB cap).
_EXTERNAL_DATA_BYTES = 1_500_000_000
_MODEL_FILE = "model.onnx"


def fusion_model_type(model_type: str) -> str | None:
    """The onnxruntime.transformers optimizer type for a HF model type, None if it has none."""
    from onnxruntime.transformers.optimizer import MODEL_TYPES
    from optimum.onnxruntime.utils import ORTConfigManager

    try:
        ort_type = ORTConfigManager.get_model_ort_type(model_type)
    except KeyError:
        return None
    return ort_type if ort_type in MODEL_TYPES else None


def _export(spec: ModelSpec, ctx: BuildContext, task: str, target: Path) -> None:
    """optimum-onnx export from the saved model directory, with an explicit task."""
    from optimum.exporters.onnx import main_export

    main_export(
        str(spec.saved_copy(ctx.artifact_dir)),
        output=target,
        task=task,
        library_name="transformers",
        local_files_only=True,
        # autocpu compares every candidate with the torch model itself; skip the double work.
        do_validation=False,
        pad_token_id=common.pad_token_for_export(spec),
        custom_onnx_configs=common.custom_export_configs(
            "onnx", spec, task, common.extra_outputs(spec)
        ),
    )


class OnnxRuntimeBackend(common.OptimumBackend):
    """ONNX Runtime (CPU execution provider) on an optimum-onnx export."""

    name: ClassVar[str] = "onnxruntime"
    description: ClassVar[str] = (
        "ONNX Runtime via optimum-onnx: exported graph, optional transformer fusions and "
        "dynamic int8, tuned session threads and optimization level"
    )
    exporter: ClassVar[str] = "onnx"
    model_module: ClassVar[str] = "optimum.onnxruntime"
    class_prefix: ClassVar[str] = "ORTModelFor"
    extra: ClassVar[str | None] = "onnxruntime"
    requires: ClassVar[tuple[str, ...]] = ("optimum-onnx", "onnxruntime")
    runtime_params: ClassVar[frozenset[str]] = frozenset(
        {"threads", "inter_threads", "opt_level", "execution_mode", "spinning", "io_binding"}
    )
    #: Versions that shape the exported files (folder name hash).
    artifact_dists: ClassVar[tuple[str, ...]] = (
        "optimum-onnx",
        "onnxruntime",
        "optimum",
        "torch",
        "transformers",
    )

    # Search space -----------------------------------------------------------------------------

    def defaults(self, hw: CpuInfo) -> dict[str, Any]:
        """ONNX Runtime's own defaults, as a user following optimum's docs would get."""
        return {
            "fusion": False,
            "quantize": "none",
            "per_channel": False,
            "threads": max(hw.usable_cpus, 1),
            "inter_threads": 1,
            "opt_level": "all",
            "execution_mode": "sequential",
            "spinning": True,
        }

    def lossy_defaults(self, spec: ModelSpec, hw: CpuInfo) -> list[dict[str, Any]]:
        """Dynamic int8 on the fused graph: the usual ORT recipe, 3-4x faster than fp32 eager
        on bert-base (42-55 ms against 155-196 ms)."""
        if not hw.fast_int8 or spec.is_seq2seq:
            return []
        fusion = fusion_model_type(spec.model_type) is not None
        return [{**self.defaults(hw), "quantize": "int8", "fusion": fusion}]

    def suggest(
        self, trial: optuna.Trial, spec: ModelSpec, hw: CpuInfo, *, lossy: bool = True
    ) -> dict[str, Any]:
        """Define-by-run: int8 only with fast int8 hardware, inter-op threads only in parallel;
        fusions and int8 rewrite one graph, so an encoder-decoder (several) gets neither."""
        one_graph = not spec.is_seq2seq
        fusion_choices = (
            [False, True] if one_graph and fusion_model_type(spec.model_type) else [False]
        )
        quantize_choices = (
            list(QUANTIZE_CHOICES) if one_graph and hw.fast_int8 and lossy else ["none"]
        )
        params: dict[str, Any] = {
            "fusion": trial.suggest_categorical(self.key("fusion"), fusion_choices),
            "quantize": trial.suggest_categorical(self.key("quantize"), quantize_choices),
        }
        params["per_channel"] = False
        if params["quantize"] == "int8":
            params["per_channel"] = trial.suggest_categorical(
                self.key("per_channel"), [False, True]
            )
        params["threads"] = self.suggest_threads(trial, hw)
        mode = trial.suggest_categorical(self.key("execution_mode"), list(EXECUTION_MODES))
        params["execution_mode"] = mode
        params["inter_threads"] = (
            trial.suggest_int(self.key("inter_threads"), 1, max(hw.usable_cpus, 1))
            if mode == "parallel"
            else 1
        )
        params["opt_level"] = trial.suggest_categorical(self.key("opt_level"), list(OPT_LEVELS))
        params["spinning"] = trial.suggest_categorical(self.key("spinning"), [True, False])
        if spec.workload == "generate":
            params["io_binding"] = trial.suggest_categorical(self.key("io_binding"), [False, True])
        return params

    # Build: export once, derive variants ------------------------------------------------------

    def build(
        self, spec: ModelSpec, params: Mapping[str, Any], ctx: BuildContext
    ) -> common.ExportedVariant:
        """The variant folder for the build params, exporting or deriving only what is missing."""
        task = common.export_task("onnx", spec.model_type, spec.task)
        root = common.model_root(ctx, "onnx", spec, self.artifact_dists, task)
        folder = root / "fp32"
        common.ensure_variant(
            folder, lambda tmp: _export(spec, ctx, task, tmp), backend=self.name, task=task
        )
        folder = _derived_variant(spec, params, root, folder)
        return common.ExportedVariant(
            folder,
            spec.task,
            with_past=task.endswith("-with-past"),
            extra_outputs=common.extra_outputs(spec),
        )

    # Bind: a session per runtime configuration ------------------------------------------------

    def bind(self, built: common.ExportedVariant, params: Mapping[str, Any]) -> Runner:
        """Create the session with the runtime params and wrap the task's ORTModel."""
        common.check_built(built)
        cls = self.task_class(built.task)
        extra: dict[str, Any] = {}
        if built.task in GENERATION_TASKS:
            extra = {"use_cache": built.with_past, "use_io_binding": params.get("io_binding")}
        if built.task != "text2text-generation":  # an encoder-decoder has one file per part
            extra["file_name"] = _MODEL_FILE
        model = cls.from_pretrained(
            built.path,
            provider="CPUExecutionProvider",
            session_options=session_options(params),
            local_files_only=True,
            **extra,
        )
        model = common.TorchLikeModel(model, _run_session if built.extra_outputs else None)
        # threads live in the session, not in torch
        return Runner(model, threads=None, fixed_outputs=True)


def _derived_variant(spec: ModelSpec, params: Mapping[str, Any], root: Path, folder: Path) -> Path:
    """The fused and/or int8 variant the build params ask for, derived from the fp32 export in
    ``folder`` (each step made once, then kept)."""
    if params.get("fusion", False):
        ort_type = fusion_model_type(spec.model_type)
        if ort_type is None:
            raise AutocpuError(
                f"onnxruntime has no transformer fusions for {spec.model_type!r}",
                "search with fusion=False for this model",
            )
        source, folder = folder, root / "fused"
        common.ensure_variant(
            folder,
            lambda tmp: _fuse(spec, ort_type, source, tmp),
            backend=OnnxRuntimeBackend.name,
            fusion=True,
        )
    quantize = params.get("quantize", "none")
    if quantize not in QUANTIZE_CHOICES:
        raise AutocpuError(f"unknown quantize={quantize!r}", "use 'none' or 'int8'")
    if quantize == "int8":
        per_channel = bool(params.get("per_channel", False))
        source = folder
        folder = root / _int8_name(source.name, per_channel)
        common.ensure_variant(
            folder,
            lambda tmp: _quantize(source, tmp, per_channel),
            backend=OnnxRuntimeBackend.name,
            int8=True,
        )
    return folder


def session_options(params: Mapping[str, Any]) -> onnxruntime.SessionOptions:
    """SessionOptions from runtime params; missing ones take ONNX Runtime's defaults."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if params.get("threads"):
        options.intra_op_num_threads = int(params["threads"])
    options.inter_op_num_threads = int(params.get("inter_threads", 1))
    level = OPT_LEVELS[params.get("opt_level", "all")]
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    mode = EXECUTION_MODES[params.get("execution_mode", "sequential")]
    options.execution_mode = getattr(ort.ExecutionMode, mode)
    spin = "1" if params.get("spinning", True) else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return options


def _run_session(model: Any, feed: dict[str, Any]) -> dict[str, Any]:
    """Every output of the model's session (its ``forward`` returns only some)."""
    import torch

    names = [output.name for output in model.session.get_outputs()]
    arrays = model.session.run(None, {k: v.numpy(force=True) for k, v in feed.items()})
    return {name: torch.from_numpy(array) for name, array in zip(names, arrays, strict=True)}


def _int8_name(source_name: str, per_channel: bool) -> str:
    base = "int8" if source_name == "fp32" else f"{source_name}-int8"
    return f"{base}-pc" if per_channel else base


def _needs_external_data(folder: Path) -> bool:
    """Large models keep weights beside the graph; derived files must do the same."""
    size = sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith(_MODEL_FILE))
    return size > _EXTERNAL_DATA_BYTES


def _fuse(spec: ModelSpec, ort_type: str, source: Path, target: Path) -> None:
    """onnxruntime.transformers fusions (Attention, SkipLayerNorm, Gelu...), Python pass only.

    ``opt_level=0`` skips the ONNX Runtime pre-pass (a full session, GBs for large models); the
    session's own graph optimization level still applies at bind time.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    config = spec.model.config
    optimized = optimize_model(
        str(source / _MODEL_FILE),
        model_type=ort_type,
        num_heads=int(getattr(config, "num_attention_heads", 0) or 0),
        hidden_size=int(getattr(config, "hidden_size", 0) or 0),
        opt_level=0,
    )
    optimized.save_model_to_file(
        str(target / _MODEL_FILE), use_external_data_format=_needs_external_data(source)
    )
    common.copy_side_files(source, target)


def _quantize(source: Path, target: Path, per_channel: bool) -> None:
    """Dynamic int8: int8 weights, activations quantized per call (u8s8, fast with VNNI)."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        source / _MODEL_FILE,
        target / _MODEL_FILE,
        per_channel=per_channel,
        weight_type=QuantType.QInt8,
        use_external_data_format=_needs_external_data(source),
        # Shape inference knows no fused contrib ops (Attention...): their outputs are float.
        extra_options={"DefaultTensorType": TensorProto.FLOAT},
    )
    common.copy_side_files(source, target)
