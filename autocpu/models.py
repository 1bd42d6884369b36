"""What autocpu knows about the user's model: its task, fingerprint and a saved copy."""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autocpu import tasks
from autocpu.errors import AutocpuError, one_line
from autocpu.hashing import stable_hash
from autocpu.tasks import task_for_class_name

#: Config keys that do not change what the model computes.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "_attn_implementation_autoset",
    "architectures",  # save_pretrained() fills it in; the class name is fingerprinted anyway
    "torch_dtype",
    "dtype",  # the weights hash covers dtypes
}


def infer_task(model: torch.nn.Module) -> str:
    """The task of the model's class, else of its config's ``architectures``, else
    :data:`~autocpu.tasks.CUSTOM_TASK`."""
    architectures = getattr(getattr(model, "config", None), "architectures", None) or []
    main_input = str(getattr(model, "main_input_name", "input_ids"))
    for name in [type(model).__name__, *architectures]:
        task = task_for_class_name(name, main_input)
        if task:
            return task
    return tasks.CUSTOM_TASK


def _config_dict(model: torch.nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None:
        return {}
    data = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    return {k: v for k, v in data.items() if k not in _VOLATILE_CONFIG_KEYS}


def weights_hash(model: torch.nn.Module) -> str:
    """Hash of every parameter and buffer (names, dtypes, shapes and bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().contiguous().cpu()
        digest.update(f"{name}:{flat.dtype}:{tuple(flat.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> dict[str, str]:
    """Architecture, config hash and weights hash: a plan is only valid for the same triple."""
    return {
        "architecture": type(model).__name__,
        "config": stable_hash(_config_dict(model)),
        "weights": weights_hash(model),
    }


@dataclass
class ModelSpec:
    """The user's model plus what backends need to rebuild or export it."""

    model: torch.nn.Module
    task: str
    fingerprint: dict[str, str]
    #: The workload being tuned ("forward", "generate"): backends offer generation knobs, and
    #: say when they cannot generate, only for "generate".
    workload: str = "forward"

    @property
    def model_type(self) -> str:
        return str(getattr(getattr(self.model, "config", None), "model_type", "unknown"))

    @property
    def fingerprint_id(self) -> str:
        """Short name of the fingerprint (folder names, plan files)."""
        return stable_hash(self.fingerprint)

    @property
    def is_causal_lm(self) -> bool:
        return self.task == "text-generation"

    @property
    def is_seq2seq(self) -> bool:
        """An encoder-decoder (BART, T5, Marian): exported as several graphs, not one."""
        return self.task == "text2text-generation"

    def saved_copy(self, root: Path) -> Path:
        """A directory holding exactly these weights (``save_pretrained``), made once.

        Exporters and worker processes load models from disk. The folder the model was loaded
        from is not used: the model in memory may differ from it (a freshly initialised head,
        in-memory fine-tuning), so the copy is keyed by the fingerprint, weights included.
        """
        target = root / f"model-{self.fingerprint_id}"
        if (target / "config.json").exists():
            return target
        if not hasattr(self.model, "save_pretrained"):
            raise AutocpuError(
                f"{type(self.model).__name__} has no save_pretrained(), so it cannot be exported",
                "pass a transformers PreTrainedModel, or limit backends to PyTorch ones",
            )
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            self.model.save_pretrained(tmp)
            try:
                Path(tmp).rename(target)
            except OSError:  # another process saved the same weights first
                if not (target / "config.json").exists():
                    raise
        return target


def make_spec(model: Any, task: str | None = None) -> ModelSpec:
    """Validate the user's model and describe it."""
    if not isinstance(model, torch.nn.Module):
        raise AutocpuError(
            f"expected a torch.nn.Module (a transformers model), got {type(model).__name__}",
            "pass the model object, e.g. AutoModel.from_pretrained(path)",
        )
    model.eval()
    return ModelSpec(
        model=model, task=task or infer_task(model), fingerprint=model_fingerprint(model)
    )


def load_model_dir(path: str | Path, task: str | None = None) -> torch.nn.Module:
    """Load a local model directory (CLI entry point).

    Without ``task`` it loads the class ``config.json`` names in ``architectures``, head and
    all, and refuses a folder whose class this transformers lacks rather than load another;
    with ``task`` it loads that task's Auto class. A config naming no architecture loads the
    bare model (AutoModel), which is what such a folder holds.
    """
    import transformers

    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise AutocpuError(
            f"no model directory at {directory} (config.json missing)",
            "pass a folder written by save_pretrained() or downloaded from the Hub",
        )
    class_name = tasks.auto_class_name(task) if task else _architecture(directory)
    model_class = getattr(transformers, class_name, None)
    if model_class is None:
        raise AutocpuError(
            f"{directory} holds a {class_name}, which transformers "
            f"{transformers.__version__} does not provide",
            "install a transformers that has it, or load the model yourself and call "
            "autocpu.tune(model)",
        )
    try:
        return model_class.from_pretrained(directory).eval()
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise AutocpuError(
            f"cannot load the model in {directory} as {class_name} ({one_line(error, 160)})",
            "pass a folder save_pretrained() wrote: a valid config.json and its weights",
        ) from None


def _architecture(directory: Path) -> str:
    """The model class the folder's config names (the first of ``architectures``)."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise AutocpuError(
            f"cannot load the model in {directory} (config.json: {one_line(error, 160)})",
            "pass a folder save_pretrained() wrote",
        ) from None
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if not architectures:
        return "AutoModel"
    if not isinstance(architectures, list) or not isinstance(architectures[0], str):
        raise AutocpuError(
            f"{directory / 'config.json'} has a malformed 'architectures' entry",
            "pass --task to pick the head, or fix config.json",
        )
    return architectures[0]
