"""Apply a saved plan in a fresh process, without searching.

    python examples/apply_saved_plan.py            # tune once (or reuse), export the plan
    python examples/apply_saved_plan.py plan.json  # a deployment process: apply it

A deployment usually ships the plan file with the model and calls ``apply_plan``; the plan's
machine fingerprint and versions are checked, and a warning says if they differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

from _minilm import SENTENCES, minilm_path
from transformers import AutoModel, AutoTokenizer

import autocpu

tokenizer = AutoTokenizer.from_pretrained(minilm_path())
model = AutoModel.from_pretrained(minilm_path()).eval()
batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")

if len(sys.argv) == 1:
    tuned = autocpu.tune(model, batch, n_trials=12)
    Path("plan.json").write_text(tuned.plan.to_json())
    print(f"wrote plan.json ({tuned.plan.backend}, {tuned.plan.speedup:.2f}x); now run:")
    print(f"  python {sys.argv[0]} plan.json")
else:
    tuned = autocpu.apply_plan(model, sys.argv[1], batch)
    print(f"applied {tuned.plan.backend} {tuned.plan.params} without searching")
    print(tuned(**batch).last_hidden_state.shape)
