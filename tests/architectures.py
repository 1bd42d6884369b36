"""One tiny model per architecture and task autocpu supports (random weights, no downloads).

Each case names the transformers class a user would load and the task autocpu should find for
it; ``build()`` makes the model from a config small enough to tune in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import transformers
from conftest import VOCAB, tiny_config

_T5 = {
    "vocab_size": VOCAB,
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 37,
    "num_layers": 2,
    "num_heads": 4,
    "decoder_start_token_id": 0,
    "pad_token_id": 0,
}
_BART = {
    "vocab_size": VOCAB,
    "d_model": 32,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 37,
    "decoder_ffn_dim": 37,
    "max_position_embeddings": 64,
}
_VIT = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 37,
    "image_size": 32,
    "patch_size": 8,
    "num_labels": 3,
}
_CONVNEXT = {
    "num_stages": 2,
    "hidden_sizes": [8, 16],
    "depths": [1, 1],
    "num_labels": 3,
    "image_size": 32,
}
_SWIN = {
    "image_size": 32,
    "patch_size": 4,
    "embed_dim": 8,
    "depths": [1, 1],
    "num_heads": [1, 2],
    "window_size": 4,
    "num_labels": 3,
}
_WAV2VEC2 = {
    "vocab_size": 32,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 37,
    "conv_dim": (16, 16),
    "conv_stride": (5, 4),
    "conv_kernel": (10, 8),
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 2,
    "num_labels": 3,
}


@dataclass(frozen=True)
class Architecture:
    """A model class, the config it is built from, and the task autocpu must infer for it."""

    model_class: str
    config_class: str
    config: dict[str, Any]
    task: str
    #: Whether a text tokenizer belongs next to it (text models) or not (vision, audio).
    text: bool = True

    @property
    def id(self) -> str:
        return self.model_class

    def build(self, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        config = getattr(transformers, self.config_class)(**self.config)
        return getattr(transformers, self.model_class)(config).eval()


def _bert(head: str, task: str) -> Architecture:
    return Architecture(head, "BertConfig", tiny_config("bert").to_diff_dict(), task)


ARCHITECTURES: tuple[Architecture, ...] = (
    _bert("BertForSequenceClassification", "text-classification"),
    _bert("BertForTokenClassification", "token-classification"),
    _bert("BertForQuestionAnswering", "question-answering"),
    _bert("BertForMaskedLM", "fill-mask"),
    _bert("BertForMultipleChoice", "multiple-choice"),
    _bert("BertModel", "feature-extraction"),
    Architecture("T5EncoderModel", "T5Config", _T5, "feature-extraction"),
    Architecture("MT5EncoderModel", "MT5Config", _T5, "feature-extraction"),
    Architecture("ViTForImageClassification", "ViTConfig", _VIT, "image-classification", False),
    Architecture("ViTModel", "ViTConfig", _VIT, "feature-extraction", False),
    Architecture(
        "ConvNextForImageClassification",
        "ConvNextConfig",
        _CONVNEXT,
        "image-classification",
        False,
    ),
    Architecture("SwinModel", "SwinConfig", _SWIN, "feature-extraction", False),
    Architecture(
        "Wav2Vec2ForSequenceClassification",
        "Wav2Vec2Config",
        _WAV2VEC2,
        "audio-classification",
        False,
    ),
    Architecture(
        "GPT2LMHeadModel", "GPT2Config", tiny_config("gpt2").to_diff_dict(), "text-generation"
    ),
    Architecture("BartForConditionalGeneration", "BartConfig", _BART, "text2text-generation"),
    Architecture("T5ForConditionalGeneration", "T5Config", _T5, "text2text-generation"),
    Architecture(
        "MarianMTModel",
        "MarianConfig",
        {**_BART, "decoder_start_token_id": 0, "pad_token_id": 0},
        "text2text-generation",
    ),
)
