"""The task table answers for every task, and unknown tasks are refused with the known ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from conftest import tiny_config

from autocpu import tasks
from autocpu.backends import _optimum_common as common
from autocpu.errors import AutocpuError
from autocpu.models import infer_task, load_model_dir, task_for_class_name

#: optimum's model classes, the tasks each package has no class for, and the runtime it needs.
OPTIMUM_CLASSES = [
    ("optimum.onnxruntime", "ORTModelFor", set(), "onnxruntime"),
    ("optimum.intel", "OVModelFor", {"multiple-choice"}, "openvino"),
]


@pytest.mark.parametrize("task", tasks.TASKS, ids=lambda t: t.name)
def test_every_task_has_its_classes_and_is_recognised(task: tasks.Task) -> None:
    assert hasattr(transformers, tasks.auto_class_name(task.name))
    assert tasks.optimum_suffix(task.name)
    for suffix in task.class_suffixes:
        assert task_for_class_name(f"Bert{suffix}") == task.name


@pytest.mark.parametrize(("module", "prefix", "missing", "runtime"), OPTIMUM_CLASSES)
def test_optimum_classes_follow_the_table(
    module: str, prefix: str, missing: set[str], runtime: str
) -> None:
    pytest.importorskip(runtime)  # optimum 1.x ships optimum.onnxruntime without the runtime
    pytest.importorskip(module)
    for name in tasks.task_names():
        found = common.model_class(module, prefix, name)
        if name not in missing:
            assert found is not None, name
            assert found.__name__ == f"{prefix}{tasks.optimum_suffix(name)}"
    assert common.model_class(module, prefix, "summarization") is None


def test_table_has_one_row_per_task_and_matches_the_bare_model_last() -> None:
    names = [task.name for task in tasks.TASKS]
    assert len(names) == len(set(names)) and sorted(names) == tasks.task_names()
    assert tasks.TASKS[-1].class_suffixes == ("Model",)
    assert task_for_class_name("GPT2LMHeadModel") == "text-generation"
    assert task_for_class_name("BertModel") == "feature-extraction"
    assert task_for_class_name("Tokenizer") is None


def test_infer_task_reads_the_class_then_the_config() -> None:
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37
    )
    model = transformers.BertForMaskedLM(config)
    assert infer_task(model) == "fill-mask"


def test_unknown_task_errors_name_the_known_ones(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(AutocpuError) as raised:
        load_model_dir(tmp_path, "summarization")
    message = str(raised.value)
    assert "unknown task 'summarization'" in message
    assert all(name in message for name in tasks.task_names())
    with pytest.raises(AutocpuError, match="text-generation"):
        tasks.auto_class_name("summarization")


def test_the_table_imports_nothing_heavy() -> None:
    code = (
        "import sys, autocpu.tasks; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_a_head_the_table_does_not_know_is_not_exported_as_another_task() -> None:
    from autocpu.backends import get_backend
    from autocpu.hardware import probe
    from autocpu.models import make_spec

    model = transformers.BertForPreTraining(tiny_config("bert"))
    assert task_for_class_name("BertForPreTraining") is None
    assert infer_task(model) == tasks.CUSTOM_TASK
    pytest.importorskip("onnxruntime")  # the legacy lane has no runtime to be refused by
    answer = get_backend("onnxruntime").availability(make_spec(model), probe())
    assert not answer.ok and "knows no task for BertForPreTraining" in answer.reason
    assert "text-classification" in answer.fix
