"""The README's first command: tune the real all-MiniLM-L6-v2, then reload it from the cache.

Run as ``python examples/demo.py [--tolerance strict|bf16|int8] [--trials N]``. The second half
runs in a fresh process, as a deployment would, and must find the plan without searching.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from _minilm import SENTENCES, mean_pool, minilm_path


def load():
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def tune_once(tolerance: str, trials: int | None, quiet: bool):
    import autocpu

    model, tokenizer = load()
    inputs = tokenizer(SENTENCES, padding=True, return_tensors="pt")

    def progress(event):
        record = event.record
        if not quiet and not event.started:
            latency = f"{record.median_ms:7.2f} ms" if record.latency else "      - ms"
            print(
                f"  {event.finished:>2}/{event.total or '?'} {record.backend:<13} {latency}  "
                f"{record.status:<10} {record.params}  {record.reason}",
                flush=True,
            )

    started = time.perf_counter()
    tuned = autocpu.tune(model, inputs, tolerance=tolerance, n_trials=trials, progress=progress)
    ready_s = time.perf_counter() - started
    import torch

    with torch.inference_mode():
        reference = mean_pool(model(**inputs).last_hidden_state, inputs["attention_mask"])
        embeddings = mean_pool(tuned(**inputs).last_hidden_state, inputs["attention_mask"])
    cosine = float((reference * embeddings).sum(-1).min())
    return tuned, ready_s, cosine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tolerance", default="strict")
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--reload", action="store_true", help="(internal) the second process")
    args = parser.parse_args()

    if args.reload:
        tuned, ready_s, cosine = tune_once(args.tolerance, args.trials, quiet=True)
        source = "cached plan, no trial ran" if tuned.from_cache else "NEW SEARCH (cache missed)"
        print(
            f"fresh process: model ready in {ready_s:.2f} s from {source}; "
            f"embedding cosine vs eager fp32 >= {cosine:.6f}"
        )
        sys.exit(0 if tuned.from_cache else 1)

    print(f"tuning all-MiniLM-L6-v2 on {len(SENTENCES)} sentences, tolerance {args.tolerance}")
    tuned, tune_s, cosine = tune_once(args.tolerance, args.trials, quiet=False)
    plan = tuned.plan
    print(tuned.explain())
    print(
        f"plan {plan.key[:12]} ({'from cache' if tuned.from_cache else f'tuned in {tune_s:.0f} s'}):"
        f" {plan.backend} {plan.params}"
    )
    print(
        f"speedup over fp32 eager: {plan.speedup:.2f}x (IQR {plan.speedup_iqr[0]:.2f}-"
        f"{plan.speedup_iqr[1]:.2f}), {plan.winner.median_ms:.2f} ms vs "
        f"{plan.baseline.median_ms:.2f} ms; embedding cosine >= {cosine:.6f}"
    )
    print("reloading in a fresh process ...", flush=True)
    command = [sys.executable, __file__, "--reload", "--tolerance", args.tolerance]
    if args.trials:
        command += ["--trials", str(args.trials)]
    sys.exit(subprocess.call(command))


if __name__ == "__main__":
    main()
