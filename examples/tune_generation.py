"""Tune SmolLM2-135M-Instruct's generate() on this CPU, then serve it from a fresh process.

Run as ``python examples/tune_generation.py [strict|bf16|int8]`` (default strict; about ten
minutes on 2 cores). This process tunes greedy generate() of 64 new tokens on a chat prompt and
prints what the plan delivers. A fresh process, as a deployment would start, then loads the
model, gets the plan from the cache (no search), answers the prompt with the tuned model and
measures tokens/s before and after, side by side.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

from _smollm2 import load

STARTED = time.perf_counter()  # before torch is imported: the fresh process's time to 1st token

NEW_TOKENS = 64
MESSAGES = [{"role": "user", "content": "Give me three tips for writing fast Python code."}]


def chat_inputs(tokenizer):
    prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    return tokenizer(prompt, return_tensors="pt")


def tune(tolerance: str):
    """autocpu.tune on the chat prompt: a search the first time, the cached plan afterwards."""
    import autocpu

    model, tokenizer = load()
    inputs = chat_inputs(tokenizer)
    tuned = autocpu.tune(model, inputs, tolerance=tolerance, max_new_tokens=NEW_TOKENS)
    return model, tokenizer, inputs, tuned


def tokens_per_s(generate, inputs, threads: int | None = None) -> float:
    """New tokens per second of one greedy generate() of exactly NEW_TOKENS tokens."""
    import torch

    if threads:  # a tuned plan may have set torch's threads for its own engine
        torch.set_num_threads(threads)
    started = time.perf_counter()
    generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return NEW_TOKENS / (time.perf_counter() - started)


def serve(tolerance: str) -> None:
    """The fresh process: plan from the cache, a reply, and tokens/s before and after."""
    import torch

    threads = torch.get_num_threads()
    model, tokenizer, inputs, tuned = tune(tolerance)
    tuned.generate(**inputs, max_new_tokens=1, do_sample=False)
    print(
        f"fresh process: {tuned.source} plan ({tuned.plan.backend}), first token "
        f"{time.perf_counter() - STARTED:.1f} s after start"
    )
    output = tuned.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"{MESSAGES[0]['content']}\n> {reply.strip()}")
    before, after = [], []
    for _ in range(5):  # alternating calls, so both see the same machine
        before.append(tokens_per_s(model.generate, inputs, threads))
        after.append(tokens_per_s(tuned.generate, inputs))
    before_s, after_s = statistics.median(before), statistics.median(after)
    print(
        f"tokens/s (whole generate(), median of 5): fp32 eager {before_s:.1f}, "
        f"tuned {after_s:.1f} ({after_s / before_s:.2f}x)"
    )
    sys.exit(0 if tuned.from_cache else 1)


def main() -> None:
    from autocpu.plans import cache_root
    from autocpu.report import generation_summary

    if sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2])
    tolerance = sys.argv[1] if len(sys.argv) > 1 else "strict"
    os.environ["AUTOCPU_CACHE_DIR"] = str(cache_root())  # the fresh process looks there too
    print(f"tuning SmolLM2's generate() of {NEW_TOKENS} tokens, tolerance {tolerance} ...")
    started = time.perf_counter()
    _, _, _, tuned = tune(tolerance)
    how = (
        "from the cache" if tuned.from_cache else f"tuned in {time.perf_counter() - started:.0f} s"
    )
    print(f"plan {tuned.plan.key[:12]} ({how}): {tuned.plan.backend} {tuned.plan.params}")
    print(generation_summary(tuned.plan))
    print(f"serving from a fresh process (plans in {os.environ['AUTOCPU_CACHE_DIR']}) ...")
    sys.exit(subprocess.call([sys.executable, __file__, "--serve", tolerance]))


if __name__ == "__main__":
    main()
