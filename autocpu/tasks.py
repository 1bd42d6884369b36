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
#: ``GPT2LMHeadModel``, so the feature-extraction row must come last.
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
    Task("text-generation", ("ForCausalLM", "LMHeadModel"), "AutoModelForCausalLM", "CausalLM"),
    Task("feature-extraction", ("Model",), "AutoModel", "FeatureExtraction"),
)

#: The task of a model whose class name says nothing (a bare ``nn.Module`` subclass).
DEFAULT_TASK = "feature-extraction"

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


def task_for_class_name(class_name: str) -> str | None:
    """The task an architecture name such as ``BertForSequenceClassification`` implies."""
    for task in TASKS:
        if class_name.endswith(task.class_suffixes):
            return task.name
    return None


def auto_class_name(task: str) -> str:
    """Name of the transformers Auto class that loads a model for ``task``."""
    return get_task(task).auto_class


def optimum_suffix(task: str) -> str | None:
    """Suffix of optimum's model class for ``task``, or None for a task it has no class for."""
    found = _BY_NAME.get(task)
    return found.optimum_suffix if found else None
