"""ONNX Runtime backend: real exports of tiny models, compared with the torch model."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("optimum.onnxruntime")
pytest.importorskip("onnxruntime")  # optimum 1.x (the legacy lane) has the former alone

import optuna
from conftest import tiny_config
from engine_cases import (
    MODELS,
    Case,
    cosine,
    generated_tokens,
    make_case,
    make_cases,
    max_diff,
    run,
)
from transformers import (
    BertLMHeadModel,
    CTRLConfig,
    CTRLModel,
    GPT2ForSequenceClassification,
)

from autocpu.backends._artifacts import COMPLETE_MARKER, is_complete
from autocpu.backends.base import BuildContext
from autocpu.backends.onnxruntime import OnnxRuntimeBackend, fusion_model_type, session_options
from autocpu.errors import AutocpuError
from autocpu.hardware import probe
from autocpu.models import make_spec
from autocpu.outputs import named_tensors


@pytest.fixture(scope="module")
def backend() -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ort-artifacts")


@pytest.fixture(scope="module")
def cases(artifacts: Path) -> dict[str, Case]:
    return make_cases(artifacts)


@pytest.fixture(scope="module")
def llama_case(artifacts: Path) -> Case:
    """A Llama: its Linear layers export as MatMul (GPT-2's Conv1D as Gemm)."""
    return make_case("llama", "AutoModelForCausalLM", artifacts)


def test_import_is_light() -> None:
    """Importing the backend modules needs none of the heavy packages (they are blocked here)."""
    heavy = ("onnxruntime", "optimum", "openvino", "nncf")
    code = (
        f"import sys; sys.modules.update(dict.fromkeys({heavy!r}));"
        "import autocpu.backends.onnxruntime as a, autocpu.backends.openvino as b;"
        "print(a.OnnxRuntimeBackend.name, b.OpenVinoBackend.name)"
    )
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["onnxruntime", "openvino"]


def test_availability(backend: OnnxRuntimeBackend, cases: dict[str, Case]) -> None:
    hw = probe()
    assert backend.availability(None, hw).ok
    assert backend.availability(cases["bert-cls"].spec, hw).ok
    no_task = backend.availability(make_spec(BertLMHeadModel(tiny_config("bert"))), hw)
    assert not no_task.ok and "text-generation" not in no_task.reason
    assert "feature-extraction" in no_task.reason
    ctrl = CTRLModel(CTRLConfig(vocab_size=50, n_embd=16, n_layer=1, n_head=2, dff=16))
    no_type = backend.availability(make_spec(ctrl), hw)
    assert not no_type.ok and "'ctrl'" in no_type.reason


def test_missing_package_names_the_fix() -> None:
    class Missing(OnnxRuntimeBackend):
        requires = ("autocpu-no-such-distribution",)

    answer = Missing().availability(None, probe())
    assert not answer.ok
    assert "autocpu-no-such-distribution" in answer.reason
    assert "autocpu[onnxruntime]" in answer.fix


@pytest.mark.parametrize("name", list(MODELS))
def test_defaults_match_torch(backend: OnnxRuntimeBackend, cases: dict[str, Case], name: str):
    case = cases[name]
    outputs = run(backend, case, backend.defaults(probe()))
    assert set(outputs) == set(case.reference)  # e.g. pooler_output for BertModel
    for key in case.reference:
        assert max_diff(outputs, case, key) <= 1e-4, key


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_fusion_matches_torch(backend: OnnxRuntimeBackend, cases: dict[str, Case], name: str):
    case = cases[name]
    params = {**backend.defaults(probe()), "fusion": True, "opt_level": "disable"}
    outputs = run(backend, case, params)
    for key in case.reference:
        assert max_diff(outputs, case, key) <= 1e-4, key


@pytest.mark.parametrize(
    ("name", "fusion", "per_channel"),
    [("bert-cls", False, False), ("bert", True, True), ("gpt2", False, True)],
)
def test_int8_stays_close(
    backend: OnnxRuntimeBackend, cases: dict[str, Case], name: str, fusion: bool, per_channel: bool
) -> None:
    case = cases[name]
    params = {
        **backend.defaults(probe()),
        "fusion": fusion,
        "quantize": "int8",
        "per_channel": per_channel,
    }
    built = backend.build(case.spec, params, case.ctx)
    assert "int8" in built.path.name
    outputs = named_tensors(backend.bind(built, params)(**case.inputs))
    for key in case.reference:
        assert cosine(outputs, case, key) > 0.99, key


@pytest.mark.parametrize(
    ("quantize", "bits", "close"), [("int8_weights", 8, 0.999), ("int4_weights", 4, 0.95)]
)
def test_weight_only_matmul_nbits_weights_stay_close_and_generate(
    backend: OnnxRuntimeBackend, llama_case: Case, quantize: str, bits: int, close: float
) -> None:
    import onnx

    case = llama_case
    recipe = {"block_size": 32, "symmetric": False, "accuracy_level": 4 if probe().fast_int8 else 1}
    params = {**backend.defaults(probe()), "quantize": quantize, **recipe}
    built = backend.build(case.spec, params, case.ctx)
    assert built.path.name == f"int{bits}w-b32-asym-l{recipe['accuracy_level']}" and built.with_past
    graph = onnx.load(str(built.path / "model.onnx"), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all(onnx.helper.get_node_attr_value(n, "bits") == bits for n in nbits)
    runner = backend.bind(built, params)
    assert cosine(named_tensors(runner(**case.inputs)), case, "logits") > close
    prompt = case.inputs["input_ids"][:1]
    tokens = runner.fn.generate(prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert tokens.shape == (1, prompt.shape[1] + 3)


def test_weight_only_quantization_of_a_gemm_export_fails_in_one_line(
    backend: OnnxRuntimeBackend, cases: dict[str, Case]
) -> None:
    params = {**backend.defaults(probe()), "quantize": "int4_weights", "block_size": 32}
    with pytest.raises(AutocpuError, match="no MatMul with constant weights"):
        backend.build(cases["gpt2"].spec, params, cases["gpt2"].ctx)


@pytest.mark.parametrize(
    ("workload", "int4", "choices"),
    [
        ("generate", True, ("none", "int8", "int8_weights", "int4_weights")),
        ("generate", False, ("none", "int8", "int8_weights")),
        ("forward", True, ("none", "int8")),
    ],
)
def test_weight_only_quantization_is_offered_for_generation_only(
    backend: OnnxRuntimeBackend, cases: dict[str, Case], workload: str, int4: bool, choices: tuple
) -> None:
    spec = dataclasses.replace(cases["gpt2"].spec, workload=workload)
    vnni = dataclasses.replace(probe(), flags=("avx512_vnni",))
    trial = optuna.create_study().ask()
    backend.suggest(trial, spec, vnni, int4=int4)
    assert trial.distributions["onnxruntime.quantize"].choices == choices


def test_second_build_reuses_the_export(backend: OnnxRuntimeBackend, cases: dict[str, Case]):
    case = cases["bert-cls"]
    params = backend.defaults(probe())
    first = backend.build(case.spec, params, case.ctx)
    onnx = first.path / "model.onnx"
    before = onnx.stat()
    # Runtime params differ: same build key, same files, nothing exported or derived again.
    other = {**params, "threads": 1, "opt_level": "basic", "spinning": False}
    assert backend.build_key(other) == backend.build_key(params)
    second = backend.build(case.spec, other, case.ctx)
    after = (second.path / "model.onnx").stat()
    assert second.path == first.path
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert first.path.parent.parent.name.startswith("onnx-")


def test_deleted_or_partial_variant_is_rebuilt(backend: OnnxRuntimeBackend, cases: dict[str, Case]):
    case = cases["gpt2"]
    params = backend.defaults(probe())
    built = backend.build(case.spec, params, case.ctx)
    shutil.rmtree(built.path)
    with pytest.raises(AutocpuError, match="build the candidate again"):
        backend.bind(built, params)  # a stale cached build says what to do
    rebuilt = backend.build(case.spec, params, case.ctx)
    assert is_complete(rebuilt.path)
    # A folder without the completeness marker (an interrupted build) is not trusted.
    (rebuilt.path / COMPLETE_MARKER).unlink()
    (rebuilt.path / "model.onnx").write_bytes(b"truncated")
    again = backend.build(case.spec, params, case.ctx)
    assert is_complete(again.path)
    assert (again.path / "model.onnx").stat().st_size > len(b"truncated")  # exported again
    outputs = named_tensors(backend.bind(again, params)(**case.inputs))
    assert max_diff(outputs, case, "logits") <= 1e-4


def test_session_gets_the_runtime_params(backend: OnnxRuntimeBackend, cases: dict[str, Case]):
    case = cases["bert-cls"]
    params = {
        **backend.defaults(probe()),
        "threads": 1,
        "inter_threads": 2,
        "opt_level": "extended",
        "execution_mode": "parallel",
        "spinning": False,
    }
    runner = backend.bind(backend.build(case.spec, params, case.ctx), params)
    assert runner.threads is None  # ORT threads live in the session
    options = runner.fn.session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.inter_op_num_threads == 2
    assert str(options.graph_optimization_level).endswith("ORT_ENABLE_EXTENDED")
    assert str(options.execution_mode).endswith("ORT_PARALLEL")
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert (
        session_options(backend.defaults(probe())).get_session_config_entry(
            "session.intra_op.allow_spinning"
        )
        == "1"
    )


def test_gpt2_exports_with_its_kv_cache_whatever_the_process_imported_before(
    backend: OnnxRuntimeBackend, cases: dict[str, Case]
) -> None:
    """optimum loads its ONNX model configs lazily: a fresh process (an isolated trial worker)
    found GPT-2 unsupported and exported it without the KV cache, one that had imported them
    exported it with the cache, and both used one folder, so a plan tuned in the first crashed
    in the second (``use_cache=True`` ... does not support pkv cache reuse)."""
    code = (
        "from autocpu.backends._optimum_common import export_task; "
        "print(export_task('onnx', 'gpt2', 'text-generation'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.split()[-1:] == ["text-generation-with-past"], done.stderr[-2000:]
    params = backend.defaults(probe())
    built = backend.build(cases["gpt2"].spec, params, cases["gpt2"].ctx)
    assert built.with_past and built.path.parent.name.endswith("-text-generation-with-past")
    assert backend.bind(built, params).fn.model.can_use_cache


def test_generate_uses_the_kv_cache(backend: OnnxRuntimeBackend, cases: dict[str, Case]) -> None:
    got, expected = generated_tokens(backend, cases["gpt2"])
    assert torch.equal(got, expected)


def test_suggest_defines_the_space(backend: OnnxRuntimeBackend, cases: dict[str, Case]) -> None:
    hw = probe()
    spec = cases["bert"].spec
    trial = optuna.create_study().ask()
    params = backend.suggest(trial, spec, hw)
    assert set(params) == set(backend.defaults(hw))
    assert all(name.startswith("onnxruntime.") for name in trial.params)
    assert trial.distributions["onnxruntime.fusion"].choices == (False, True)
    assert 1 <= params["threads"] <= hw.usable_cpus
    no_fusion = dataclasses.replace(spec)
    no_fusion.model.config.model_type = "no-such-type"
    trial = optuna.create_study().ask()
    try:
        backend.suggest(trial, no_fusion, hw)
    finally:
        no_fusion.model.config.model_type = "bert"
    assert trial.distributions["onnxruntime.fusion"].choices == (False,)
    no_vnni = dataclasses.replace(hw, flags=())
    trial = optuna.create_study().ask()
    assert backend.suggest(trial, spec, no_vnni)["quantize"] == "none"
    assert trial.distributions["onnxruntime.quantize"].choices == ("none",)


def test_fusion_model_types() -> None:
    assert fusion_model_type("bert") == "bert"
    assert fusion_model_type("gpt2") == "gpt2"
    assert fusion_model_type("opt") is None


def test_classifier_without_pad_token(backend: OnnxRuntimeBackend, artifacts: Path) -> None:
    """GPT-2 classifiers often have no pad token; the exporter would then want a tokenizer."""
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(tiny_config("gpt2")).eval()
    assert model.config.pad_token_id is None
    inputs = {"input_ids": torch.randint(1, 100, (1, 12))}
    with torch.inference_mode():
        expected = model(**inputs).logits
    ctx = BuildContext(hw=probe(), example_inputs=[inputs], artifact_dir=artifacts)
    params = backend.defaults(probe())
    runner = backend.bind(backend.build(make_spec(model), params, ctx), params)
    assert (runner(**inputs).logits - expected).abs().max().item() <= 1e-4
