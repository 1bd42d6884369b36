"""Tune a text classifier and use it in a ``transformers.pipeline``.

    python examples/pipeline_classifier.py

The classification head on top of MiniLM is freshly initialised (no labelled data ships with
this repo), so the labels are arbitrary; the point is that the tuned model is a drop-in.
"""

from __future__ import annotations

from _minilm import SENTENCES, minilm_path
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline
from transformers.utils import logging as hf_logging

import autocpu

hf_logging.set_verbosity_error()  # silence "newly initialized classifier weights"
tokenizer = AutoTokenizer.from_pretrained(minilm_path())
model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).eval()

tuned = autocpu.tune(model, tokenizer(SENTENCES, padding=True, return_tensors="pt"), n_trials=12)
print(f"{tuned.plan.backend} {tuned.plan.params}: {tuned.plan.speedup:.2f}x")

classify = pipeline("text-classification", model=tuned, tokenizer=tokenizer)
reference = pipeline("text-classification", model=model, tokenizer=tokenizer)
for text, got, want in zip(SENTENCES, classify(SENTENCES), reference(SENTENCES), strict=True):
    print(f"{got['label']} {got['score']:.4f} (eager: {want['label']} {want['score']:.4f})  {text}")
