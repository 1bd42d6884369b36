"""The tasks autocpu tunes: how each is recognised and which classes load it.

One row per task ties together the names three libraries use for it: the class-name suffixes
of transformers architectures (``BertForSequenceClassification``), the transformers Auto class
that loads a saved model for it, and the suffix of optimum's model classes
(``ORTModelFor<suffix>``, ``OVModelFor<suffix>``). Task names are the ones optimum's exporters
and pipelines use. This module imports nothing heavy: the CLI and the backends' availability
checks use it before torch or transformers are needed.
"""

from __future__ import annotations

from dataclasses import dataclass

from autocpu.errors import AutocpuError


@dataclass(frozen=True)
class Task:
    """One task and its name in transformers and optimum."""

    name: str
    #: Endings of architecture class names that identify the task.
    class_suffixes: tuple[str, ...]
    #: The transformers Auto class that loads a model directory for this task.
    auto_class: str
    #: optimum's class for the task is ``<prefix>For<optimum_suffix>``.
    optimum_suffix: str


#: Matched in order, first hit wins. ``Model`` also ends head classes such as
#: ``GPT2LMHeadModel``, so the feature-extraction row must come last. It covers the bare
#: encoders of every modality: ``BertModel``, ``T5EncoderModel``, ``ViTModel``, ``ConvNextModel``.
TASKS: tuple[Task, ...] = (
    Task(
        "text-classification",
        ("ForSequenceClassification",),
        "AutoModelForSequenceClassification",
        "SequenceClassification",
    ),
    Task(
        "token-classification",
        ("ForTokenClassification",),
        "AutoModelForTokenClassification",
        "TokenClassification",
    ),
    Task(
        "question-answering",
        ("ForQuestionAnswering",),
        "AutoModelForQuestionAnswering",
        "QuestionAnswering",
    ),
    Task("fill-mask", ("ForMaskedLM",), "AutoModelForMaskedLM", "MaskedLM"),
    Task("multiple-choice", ("ForMultipleChoice",), "AutoModelForMultipleChoice", "MultipleChoice"),
    Task(
        "image-classification",
        ("ForImageClassification",),
        "AutoModelForImageClassification",
        "ImageClassification",
    ),
    Task(
        "audio-classification",
        ("ForAudioClassification",),
        "AutoModelForAudioClassification",
        "AudioClassification",
    ),
    Task("text-generation", ("ForCausalLM", "LMHeadModel"), "AutoModelForCausalLM", "CausalLM"),
    # Marian's head is ``MarianMTModel``: it must match before the bare-model row.
    Task(
        "text2text-generation",
        ("ForConditionalGeneration", "MTModel"),
        "AutoModelForSeq2SeqLM",
        "Seq2SeqLM",
    ),
    Task("feature-extraction", ("Model",), "AutoModel", "FeatureExtraction"),
)

#: Main inputs (``model.main_input_name``) of audio models: their ``...ForSequenceClassification``
#: head (Wav2Vec2, HuBERT) classifies audio, and optimum files it under audio classification.
AUDIO_INPUTS = frozenset({"input_values", "input_features"})

#: Tasks whose models generate text (``generate()``): tuned on generation by default, and
#: exported with their KV cache.
GENERATION_TASKS = frozenset({"text-generation", "text2text-generation"})

#: The task of a model whose class names no head the table knows (``BertForPreTraining``, a
#: bare ``nn.Module``): PyTorch backends tune it as it is; exporters, which need a task to pick
#: the graph's outputs, do not guess one.
CUSTOM_TASK = "custom"

_BY_NAME = {task.name: task for task in TASKS}


def task_names() -> list[str]:
    """Every known task name, sorted."""
    return sorted(_BY_NAME)


def get_task(name: str) -> Task:
    """The row for ``name``; an unknown name is an error that lists the known ones."""
    task = _BY_NAME.get(name)
    if task is None:
        raise AutocpuError(f"unknown task {name!r}", f"use one of: {', '.join(task_names())}")
    return task


def task_for_class_name(class_name: str, main_input: str = "input_ids") -> str | None:
    """The task an architecture name such as ``BertForSequenceClassification`` implies, for a
    model whose main input is ``main_input``; None for a head the table does not know
    (``BertForPreTraining``): such a model is never treated as another task's."""
    for task in TASKS:
        if class_name.endswith(task.class_suffixes):
            if task.name == "text-classification" and main_input in AUDIO_INPUTS:
                return "audio-classification"
            return task.name
    return None


def auto_class_name(task: str) -> str:
    """Name of the transformers Auto class that loads a model for ``task``."""
    return get_task(task).auto_class


def optimum_suffix(task: str) -> str | None:
    """Suffix of optimum's model class for ``task``, or None for a task it has no class for."""
    found = _BY_NAME.get(task)
    return found.optimum_suffix if found else None
