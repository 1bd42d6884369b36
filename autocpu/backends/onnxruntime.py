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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from autocpu.backends import _artifacts as artifacts
from autocpu.backends import _optimum_common as common
from autocpu.backends.base import BuildContext, Runner, quiet_build_logs
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
#: none, dynamic int8 (weights and activations), or weight-only int8 / int4 ``MatMulNBits``
#: (weights stored in blocks with a scale each; generation only, where each new token reads
#: every weight once).
QUANTIZE_CHOICES = ("none", "int8", "int8_weights", "int4_weights")
WEIGHT_ONLY = {"int8_weights": 8, "int4_weights": 4}
#: Weights per scale of a ``MatMulNBits`` weight.
BLOCK_SIZES = (32, 64, 128)
#: ``MatMulNBits``' ``accuracy_level``: what it computes in (1: fp32 activations; 4: the
#: activations quantized to int8 per block, the fast path on VNNI and AMX CPUs).
ACCURACY_LEVELS = (1, 4)

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
        on bert-base (42-55 ms against 155-196 ms); for generation, int8 ``MatMulNBits``
        weights as well."""
        if spec.is_seq2seq:
            return []
        fusion = fusion_model_type(spec.model_type) is not None
        recipes = [{**self.defaults(hw), "quantize": "int8", "fusion": fusion}]
        recipes = recipes if hw.fast_int8 else []
        if spec.workload == "generate":
            recipes.append(self._weight_only_recipe(hw, "int8_weights"))
        return recipes

    def suggest(
        self,
        trial: optuna.Trial,
        spec: ModelSpec,
        hw: CpuInfo,
        *,
        lossy: bool = True,
        int4: bool = False,
    ) -> dict[str, Any]:
        """Define-by-run: int8 only with fast int8 hardware, inter-op threads only in parallel;
        fusions and int8 rewrite one graph, so an encoder-decoder (several) gets neither."""
        one_graph = not spec.is_seq2seq
        fusion_choices = (
            [False, True] if one_graph and fusion_model_type(spec.model_type) else [False]
        )
        params: dict[str, Any] = {
            "fusion": trial.suggest_categorical(self.key("fusion"), fusion_choices),
            "quantize": trial.suggest_categorical(
                self.key("quantize"), _quantize_choices(spec, hw, lossy=lossy, int4=int4)
            ),
        }
        params["per_channel"] = False
        if params["quantize"] == "int8":
            params["per_channel"] = trial.suggest_categorical(
                self.key("per_channel"), [False, True]
            )
        if params["quantize"] in WEIGHT_ONLY:
            params["block_size"] = trial.suggest_categorical(
                self.key("block_size"), list(BLOCK_SIZES)
            )
            params["symmetric"] = trial.suggest_categorical(self.key("symmetric"), [False, True])
            levels = list(ACCURACY_LEVELS) if hw.fast_int8 else [1]
            params["accuracy_level"] = trial.suggest_categorical(self.key("accuracy_level"), levels)
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

    def int4_defaults(self, spec: ModelSpec, hw: CpuInfo) -> list[dict[str, Any]]:
        """onnxruntime's ``MatMulNBitsQuantizer`` defaults (4 bits, blocks of 128, asymmetric)
        at int8 compute where the CPU has fast int8, on the KV-cache export."""
        if "int4_weights" not in _quantize_choices(spec, hw, lossy=True, int4=True):
            return []
        return [self._weight_only_recipe(hw, "int4_weights")]

    def _weight_only_recipe(self, hw: CpuInfo, quantize: str) -> dict[str, Any]:
        level = 4 if hw.fast_int8 else 1
        recipe = {"block_size": 128, "symmetric": False, "accuracy_level": level}
        return {**self.defaults(hw), "quantize": quantize, **recipe, "io_binding": True}

    # Build: export once, derive variants ------------------------------------------------------

    def build(
        self, spec: ModelSpec, params: Mapping[str, Any], ctx: BuildContext
    ) -> common.ExportedVariant:
        """The variant folder for the build params, exporting or deriving only what is missing."""
        task = common.export_task("onnx", spec.model_type, spec.task)
        root = common.model_root(ctx, "onnx", spec, self.artifact_dists, task)
        folder = root / "fp32"
        artifacts.ensure_variant(
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


def _quantize_choices(spec: ModelSpec, hw: CpuInfo, *, lossy: bool, int4: bool) -> list[str]:
    """What ``quantize`` may be: dynamic int8 needs fast int8 and one graph; weight-only int8
    needs a decoder-only model's generation, int4 a tolerance that admits it too."""
    if not lossy or spec.is_seq2seq:
        return ["none"]
    choices = ["none", "int8"] if hw.fast_int8 else ["none"]
    if spec.workload == "generate":
        choices += ["int8_weights", "int4_weights"] if int4 else ["int8_weights"]
    return choices


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
        artifacts.ensure_variant(
            folder,
            lambda tmp: _fuse(spec, ort_type, source, tmp),
            backend=OnnxRuntimeBackend.name,
            fusion=True,
        )
    quantize = params.get("quantize", "none")
    if quantize not in QUANTIZE_CHOICES:
        raise AutocpuError(f"unknown quantize={quantize!r}", f"use one of {QUANTIZE_CHOICES}")
    if quantize in WEIGHT_ONLY:
        weights = WeightOnly.of(quantize, params)
        source, folder = folder, root / weights.folder_name(folder.name)
        artifacts.ensure_variant(
            folder,
            lambda tmp: weights.apply(source, tmp),
            backend=OnnxRuntimeBackend.name,
            weights=asdict(weights),
        )
    if quantize == "int8":
        per_channel = bool(params.get("per_channel", False))
        source = folder
        folder = root / _int8_name(source.name, per_channel)
        artifacts.ensure_variant(
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


@dataclass(frozen=True)
class WeightOnly:
    """Weight-only ``MatMulNBits`` quantization of every MatMul with a constant weight (the
    embeddings' Gather stays float), made once per setting from its source variant."""

    bits: int
    block_size: int
    symmetric: bool
    accuracy_level: int

    @classmethod
    def of(cls, quantize: str, params: Mapping[str, Any]) -> WeightOnly:
        found = cls(
            WEIGHT_ONLY[quantize],
            int(params.get("block_size", 128)),
            bool(params.get("symmetric", False)),
            int(params.get("accuracy_level", 4)),
        )
        if found.block_size not in BLOCK_SIZES or found.accuracy_level not in ACCURACY_LEVELS:
            raise AutocpuError(
                f"unknown block_size={found.block_size} or accuracy_level={found.accuracy_level}",
                f"use block_size in {BLOCK_SIZES} and accuracy_level in {ACCURACY_LEVELS}",
            )
        return found

    def folder_name(self, source_name: str) -> str:
        kind = "sym" if self.symmetric else "asym"
        name = f"int{self.bits}w-b{self.block_size}-{kind}-l{self.accuracy_level}"
        return name if source_name == "fp32" else f"{source_name}-{name}"

    def apply(self, source: Path, target: Path) -> None:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        model = onnx.load(str(source / _MODEL_FILE))
        with quiet_build_logs():
            quantizer = MatMulNBitsQuantizer(
                model,
                bits=self.bits,
                block_size=self.block_size,
                is_symmetric=self.symmetric,
                accuracy_level=self.accuracy_level,
            )
            quantizer.process()
        if not any(node.op_type == "MatMulNBits" for node in quantizer.model.model.graph.node):
            raise AutocpuError(
                "no MatMul with constant weights to store in blocks (an export of Gemm nodes, "
                "as GPT-2's, has none)",
                "search without quantize='int8_weights'/'int4_weights' for this model",
            )
        quantizer.model.save_model_to_file(
            str(target / _MODEL_FILE), use_external_data_format=_needs_external_data(source)
        )
        common.copy_side_files(source, target)
