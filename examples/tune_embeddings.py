"""Tune an embedding model and use it: sentence embeddings and a similarity search.

python examples/tune_embeddings.py
"""

from __future__ import annotations

import torch
from _minilm import SENTENCES, mean_pool, minilm_path
from transformers import AutoModel, AutoTokenizer

import autocpu

tokenizer = AutoTokenizer.from_pretrained(minilm_path())
model = AutoModel.from_pretrained(minilm_path()).eval()

# Tune on a batch shaped like production traffic; the tuned model accepts other shapes too.
batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
tuned = autocpu.tune(model, batch, tolerance="strict", n_trials=12)
print(f"{tuned.plan.backend} {tuned.plan.params}: {tuned.plan.speedup:.2f}x over fp32 eager")

query = tokenizer(["How do I make my model faster on a CPU?"], return_tensors="pt")
with torch.inference_mode():
    docs = mean_pool(tuned(**batch).last_hidden_state, batch["attention_mask"])
    question = mean_pool(tuned(**query).last_hidden_state, query["attention_mask"])
scores = (docs @ question.T).squeeze(-1)
for score, sentence in sorted(zip(scores.tolist(), SENTENCES, strict=True), reverse=True):
    print(f"{score:.3f}  {sentence}")
