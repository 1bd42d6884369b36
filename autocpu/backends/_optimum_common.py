"""Plumbing shared by the two optimum-based backends (ONNX Runtime and OpenVINO).

Both export the model once through an optimum exporter, keep the files on disk keyed by the
versions that produced them, derive variants (fused, int8) from that export, and load a variant
with the optimum model class of the task. Nothing heavy is imported at module level: this module
is imported with the backends, which must load fast and work without optimum installed.
"""

from __future__ import annotations

import importlib
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from autocpu import tasks
from autocpu.backends._artifacts import check_complete, versions_hash
from autocpu.backends.base import Availability, Backend
from autocpu.errors import AutocpuError

if TYPE_CHECKING:
    from autocpu.backends.base import BuildContext
    from autocpu.hardware import CpuInfo
    from autocpu.models import ModelSpec

#: Importing these registers each exporter's model configs with optimum's TasksManager. The
#: package alone is not enough: ``optimum.exporters.onnx`` loads its configs lazily, so without
#: them GPT-2 looks unsupported, or exportable with its KV cache, depending on what else the
#: process has imported.
_EXPORTER_MODULES = {
    "onnx": "optimum.exporters.onnx.model_configs",
    "openvino": "optimum.exporters.openvino.model_configs",
}

#: Files of an export that are not the model itself, copied into derived variants.
SIDE_FILES = ("config.json", "generation_config.json")


@dataclass(frozen=True)
class ExportedVariant:
    """A complete variant folder on disk and what is needed to load it."""

    path: Path
    task: str
    #: True when a text-generation export carries the KV cache (so ``generate()`` reuses it).
    with_past: bool = False
    #: Graph outputs beyond what optimum's model class returns (see :class:`TorchLikeModel`).
    extra_outputs: tuple[str, ...] = ()


class OptimumBackend(Backend):
    """A backend that exports through an optimum exporter and runs an optimum model class."""

    simplicity: ClassVar[int] = 2
    #: optimum's exporter name ("onnx", "openvino").
    exporter: ClassVar[str]
    #: Where the task's model classes live, and their prefix (``ORTModelFor``, ``OVModelFor``).
    model_module: ClassVar[str]
    class_prefix: ClassVar[str]

    def availability(self, spec: ModelSpec | None, hw: CpuInfo) -> Availability:
        """Packages present and, for a model, the exporter and a model class handle it."""
        missing = self.missing_packages()
        if missing is not None or spec is None:
            return missing or Availability.yes()
        if spec.task == tasks.CUSTOM_TASK:
            return Availability.no(
                f"autocpu knows no task for {spec.fingerprint['architecture']}, and an export "
                "needs one",
                f"pass task= if the model is one of: {', '.join(tasks.task_names())}",
            )
        other = exported_class_mismatch(spec)
        if other:
            return Availability.no(
                f"optimum exports {spec.model_type} for {spec.task} as {other}, not as "
                f"{spec.fingerprint['architecture']}",
                _OTHER_BACKEND,
            )
        if model_class(self.model_module, self.class_prefix, spec.task) is None:
            reason = f"{self.requires[0]} has no {self.class_prefix}... class for {spec.task!r}"
        else:
            reason = exporter_reason(self.exporter, spec.model_type, spec.task)
        return Availability.no(reason, _OTHER_BACKEND) if reason else Availability.yes()

    def task_class(self, task: str) -> type:
        """The optimum model class that loads this backend's files for ``task``."""
        cls = model_class(self.model_module, self.class_prefix, task)
        if cls is None:
            raise AutocpuError(
                f"{self.requires[0]} has no {self.class_prefix}... class for {task!r}",
                _OTHER_BACKEND,
            )
        return cls


_OTHER_BACKEND = "use another backend for this model"


def exported_class_mismatch(spec: ModelSpec) -> str | None:
    """The class an export would load instead of the user's, or None when it is the same.

    The exporters load the saved folder with the task's Auto class, which for an encoder-only
    class of an encoder-decoder type (``T5EncoderModel``) is the full model (``T5Model``): its
    graph would take decoder inputs and compute something else.
    """
    import transformers

    auto = getattr(transformers, tasks.auto_class_name(spec.task))
    try:
        loaded = auto._model_mapping[type(spec.model.config)]
    except (AttributeError, KeyError):
        return None
    if isinstance(loaded, (list, tuple)):
        loaded = loaded[0]
    mine = type(spec.model).__name__
    return None if loaded.__name__ == mine else loaded.__name__


def model_class(module: str, prefix: str, task: str) -> type | None:
    """The optimum class for ``task`` (e.g. ``ORTModelForCausalLM``), or None if it has none."""
    suffix = tasks.optimum_suffix(task)
    if suffix is None:
        return None
    return getattr(importlib.import_module(module), f"{prefix}{suffix}", None)


def supported_tasks(exporter: str, model_type: str) -> set[str] | str:
    """Tasks the exporter supports for ``model_type``, or the exporter's reason when none."""
    importlib.import_module(_EXPORTER_MODULES[exporter])
    from optimum.exporters.tasks import TasksManager

    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(
            model_type, exporter=exporter, library_name="transformers"
        )
    except KeyError:
        return f"the {exporter} exporter does not support model type {model_type!r}"
    return set(tasks)


def exporter_reason(exporter: str, model_type: str, task: str) -> str | None:
    """Why the exporter cannot export this model for this task, or None when it can."""
    tasks = supported_tasks(exporter, model_type)
    if isinstance(tasks, str):
        return tasks
    if task not in tasks:
        plain = ", ".join(sorted(t for t in tasks if not t.endswith("-with-past")))
        return f"the {exporter} exporter supports {model_type} only for: {plain}"
    return None


def export_task(exporter: str, model_type: str, task: str) -> str:
    """Exporter task name: generation tasks are exported with their KV cache when supported
    (a forward pass without ``past_key_values`` gives the same logits)."""
    supported = supported_tasks(exporter, model_type)
    with_past = f"{task}-with-past"
    if task in tasks.GENERATION_TASKS and isinstance(supported, set) and with_past in supported:
        return with_past
    return task


def extra_outputs(spec: ModelSpec) -> tuple[str, ...]:
    """Outputs of the torch model that optimum's feature-extraction export leaves out.

    optimum exports and returns only ``last_hidden_state``; a BERT-like ``AutoModel`` also
    returns ``pooler_output``, which users (and autocpu's accuracy check) expect to find.
    """
    if spec.task == "feature-extraction" and getattr(spec.model, "pooler", None) is not None:
        return ("pooler_output",)
    return ()


def pad_token_for_export(spec: ModelSpec) -> int | None:
    """A pad token id for classifiers that have none (GPT-2 style), else None.

    Both exporters then look for a tokenizer next to the weights and fail without one. Without
    a pad token the torch model pools the last token of each row; ``-1`` never occurs in
    ``input_ids``, so the exported graph pools the last token too, for any batch size.
    """
    config = getattr(spec.model, "config", None)
    if spec.task == "text-classification" and getattr(config, "pad_token_id", 0) is None:
        return -1
    return None


def custom_export_configs(
    exporter: str, spec: ModelSpec, task: str, extra: tuple[str, ...]
) -> dict[str, Any] | None:
    """The exporter's own config for this model, with ``extra`` added to its outputs."""
    if not extra:
        return None
    from optimum.exporters.tasks import TasksManager

    constructor = TasksManager.get_exporter_config_constructor(
        exporter=exporter, model=spec.model, task=task, library_name="transformers"
    )
    config = constructor(spec.model.config)
    base = type(config)

    def outputs(self: Any) -> dict[str, dict[int, str]]:
        found = base.outputs.fget(self)
        for name in extra:
            found.setdefault(name, {0: "batch_size"})
        return found

    # Swap the class rather than re-instantiate: the constructor may bind extra arguments.
    config.__class__ = type(f"{base.__name__}WithOutputs", (base,), {"outputs": property(outputs)})
    return {"model": config}


#: Runs a loaded optimum model on a feed of its graph inputs; returns every graph output.
RunAll = Callable[[Any, dict[str, Any]], dict[str, Any]]


class TorchLikeModel:
    """An optimum model called with the torch model's keyword inputs, returning its fields.

    Fills what torch defaults but the exported graph requires (an all-ones ``attention_mask``,
    zero ``token_type_ids``). With ``run_all`` (feature extraction with :func:`extra_outputs`)
    it returns every graph output, since optimum's ``forward`` returns ``last_hidden_state``
    only. Other attributes (``config``, ``generate``, ``session``...) are the wrapped model's.
    """

    def __init__(self, model: Any, run_all: RunAll | None = None) -> None:
        self.model = model
        self._run_all = run_all

    def __call__(self, **inputs: Any) -> Any:
        import torch

        names = getattr(self.model, "input_names", None) or {}
        ids = inputs.get("input_ids")
        if ids is not None:
            if "attention_mask" in names and inputs.get("attention_mask") is None:
                inputs["attention_mask"] = torch.ones_like(ids)
            if "token_type_ids" in names and inputs.get("token_type_ids") is None:
                inputs["token_type_ids"] = torch.zeros_like(ids)
        if self._run_all is None:
            return self._forward(inputs)
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        feed = {k: v for k, v in inputs.items() if k in names}
        return BaseModelOutputWithPooling(**self._run_all(self.model, feed))

    def _forward(self, inputs: dict[str, Any]) -> Any:
        """The optimum model's forward; an encoder-decoder's is given the encoder's outputs,
        run here, so that its ``encoder_last_hidden_state`` is returned as torch returns it
        (OpenVINO's forward drops it)."""
        encoder = getattr(self.model, "encoder", None)
        if encoder is None or "decoder_input_ids" not in inputs or "encoder_outputs" in inputs:
            return self.model(**inputs)
        encoded = encoder(
            input_ids=inputs.get("input_ids"), attention_mask=inputs.get("attention_mask")
        )
        output = self.model(**inputs, encoder_outputs=encoded)
        if getattr(output, "encoder_last_hidden_state", None) is None:
            # A copy: the runtime may reuse the encoder's output buffer on its next call.
            output["encoder_last_hidden_state"] = encoded.last_hidden_state.clone()
        return output

    def __getattr__(self, name: str) -> Any:
        if name == "model":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)


def model_root(
    ctx: BuildContext, prefix: str, spec: ModelSpec, dists: Iterable[str], export_task: str
) -> Path:
    """``<artifact_dir>/<prefix>-<versions hash>/<model fingerprint>-<export task>``: an export
    with the KV cache and one without never share a folder."""
    return (
        ctx.artifact_dir
        / f"{prefix}-{versions_hash(dists)}"
        / f"{spec.fingerprint_id}-{export_task}"
    )


def check_built(built: ExportedVariant) -> None:
    """Fail clearly when a cached build's folder was deleted since (build() remakes it)."""
    check_complete(built.path)


def copy_side_files(source: Path, target: Path) -> None:
    """Copy config files so a derived variant folder loads on its own."""
    for name in SIDE_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
