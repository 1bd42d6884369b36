"""The generation workload: tuned on greedy generate(), compared teacher-forced, served through
the plan (generate(), pipelines, streamers), keyed and cached apart from forward plans."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from typing import Any

import pytest
import torch
import transformers
from conftest import run_cli, tiny_model, write_tokenizer

import autocpu
from autocpu.accuracy import INT4_PERPLEXITY, INT8_PERPLEXITY, Tolerance, perplexity_ratio
from autocpu.canary import check_canary, save_canary
from autocpu.errors import AutocpuError
from autocpu.plans import PlanCache
from autocpu.workloads import Generation

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return tiny_model("llama", "AutoModelForCausalLM")


def prompts(rows: int = 1, length: int = 10, seed: int = 3) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 100, (rows, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def greedy(model: Any, inputs: dict, new_tokens: int = NEW_TOKENS) -> torch.Tensor:
    return model.generate(
        **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
    )


class CountingForward:
    """Counts calls of a model's own forward (what generate() runs when the plan is not used)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.calls, self.original = model, 0, model.forward

    def __enter__(self) -> CountingForward:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return self.original(*args, **kwargs)

        self.model.forward = counted
        return self

    def __exit__(self, *exc: object) -> None:
        del self.model.forward


# The accuracy rules --------------------------------------------------------------------------


class Diverging:
    """A candidate exact in its logits whose own greedy tokens change after ``keep`` tokens."""

    def __init__(self, model: torch.nn.Module, keep: int) -> None:
        self.model, self.keep = model, keep
        self.generation_config = model.generation_config

    def __call__(self, **inputs: Any) -> Any:
        return self.model(**inputs)

    def generate(self, **kwargs: Any) -> torch.Tensor:
        sequences = self.model.generate(**kwargs).clone()
        start = kwargs["input_ids"].shape[-1] + self.keep
        sequences[:, start:] = (sequences[:, start:] + 1) % 100
        return sequences


class ShiftedLogits(Diverging):
    """Greedy tokens identical to fp32's, but the top-1 changed at one teacher-forced position."""

    def __call__(self, **inputs: Any) -> Any:
        output = self.model(**inputs)
        logits = output.logits.clone()
        logits[0, 3] = logits[0, 3].flip(-1)
        return type(output)(logits=logits)

    def generate(self, **kwargs: Any) -> torch.Tensor:
        return self.model.generate(**kwargs)


class Surprised(Diverging):
    """Greedy tokens and top-1 identical to fp32's, but where the next token (the input's one
    position on) is the top-1, every other logit raised by ``raise_by`` up to just below it:
    the same ranking, a less likely continuation."""

    def __init__(self, model: torch.nn.Module, raise_by: float) -> None:
        super().__init__(model, keep=NEW_TOKENS)
        self.raise_by = raise_by

    def __call__(self, **inputs: Any) -> Any:
        output = self.model(**inputs)
        logits = output.logits.clone()
        body, following = logits[:, :-1], inputs["input_ids"][:, 1:].unsqueeze(-1)
        target = body.gather(-1, following)
        raised = torch.minimum(body + self.raise_by, target - 1e-3).scatter(-1, following, target)
        is_top = body.argmax(-1) == following.squeeze(-1)
        body[is_top] = raised[is_top]
        return type(output)(logits=logits)

    def generate(self, **kwargs: Any) -> torch.Tensor:
        return self.model.generate(**kwargs)


def gate(llama: torch.nn.Module, candidate: Any, tolerance: Tolerance):
    workload = Generation([prompts(rows=2)], NEW_TOKENS)
    references = workload.references(llama)
    return workload.compare(references, workload.run(candidate), tolerance)


def test_fp32_eager_matches_itself_exactly(llama):
    report = gate(llama, llama, Tolerance.strict())
    assert report.passed, report.failures
    assert (report.same_tokens, report.same_prefix, report.min_argmax) == (1.0, NEW_TOKENS, 1.0)


def test_the_workload_generates_every_token_through_eos_without_masking_it(llama):
    inputs = prompts()
    first = int(llama(**inputs).logits[0, -1].argmax())
    eos_first = copy.deepcopy(llama.generation_config)
    eos_first.eos_token_id, eos_first.pad_token_id = first, first
    model = copy.copy(llama)
    model.generation_config = eos_first
    sequences = Generation([inputs], NEW_TOKENS).generate(model, inputs)
    assert sequences.shape[-1] == inputs["input_ids"].shape[-1] + NEW_TOKENS
    # EOS is the model's own greedy choice here: it is generated, not masked, and not a stop.
    assert int(sequences[0, inputs["input_ids"].shape[-1]]) == first


def test_a_candidate_that_diverges_after_a_few_tokens_fails_strict_only(llama):
    diverging = Diverging(llama, keep=2)
    strict = gate(llama, diverging, Tolerance.strict())
    assert not strict.passed
    assert strict.same_prefix == 2
    assert strict.same_tokens == pytest.approx(2 / NEW_TOKENS)
    assert "greedy tokens: 33% identical" in strict.failures[0]
    # Teacher-forced, its logits are exact: a lossy tolerance admits it, tokens reported.
    loose = gate(llama, diverging, Tolerance.bf16())
    assert loose.passed, loose.failures
    assert loose.max_rel == 0.0 and loose.same_prefix == 2


def test_explicit_min_same_tokens_bounds_lossy_tolerances_too(llama):
    tolerance = Tolerance(max_rel=0.05, min_cosine=0.999, min_argmax=0.9, min_same_tokens=0.5)
    report = gate(llama, Diverging(llama, keep=2), tolerance)
    assert report.failures == [report.failures[0]] and "< 50%" in report.failures[0]


def test_a_changed_top1_fails_teacher_forced_even_with_identical_tokens(llama):
    report = gate(llama, ShiftedLogits(llama, keep=0), Tolerance.strict())
    assert report.same_tokens == 1.0
    assert any("argmax agreement" in failure for failure in report.failures)


def test_left_padded_prompts_compare_exactly_on_an_exported_engine(llama, tmp_path):
    """Engines derive positions from the mask their own way: teacher forcing passes them."""
    pytest.importorskip("onnxruntime")
    from autocpu.backends import BuildContext, get_backend
    from autocpu.hardware import probe
    from autocpu.models import make_spec

    batch = prompts(rows=2)
    batch["attention_mask"][1, :4] = 0  # the second prompt is 6 tokens, left-padded
    workload = Generation([batch], NEW_TOKENS)
    references = workload.references(llama)
    backend = get_backend("onnxruntime")
    params = backend.defaults(probe())
    spec = make_spec(llama)
    built = backend.build(spec, params, BuildContext(probe(), [batch], tmp_path, NEW_TOKENS))
    report = workload.compare(references, workload.run(backend.bind(built, params)), Tolerance())
    assert report.passed, report.failures


def test_the_perplexity_ratio_is_one_for_fp32_and_rises_with_the_candidates_surprise():
    sequences = torch.tensor([[5, 1, 2, 3]])
    logits = torch.zeros(1, 4, 6)
    assert perplexity_ratio(logits, logits, sequences, prompt_length=2) == 1.0
    surprised = logits.clone()
    surprised[0, 1, 2] = -1.0  # token 2 (after the prompt) is less likely; token 3 as before
    expected = math.exp((torch.logsumexp(surprised[0, 1], -1) + 1.0 - math.log(6)) / 2)
    ratio = perplexity_ratio(logits, surprised, sequences, prompt_length=2)
    assert ratio == pytest.approx(float(expected)) and ratio > 1.0


def test_a_candidate_that_finds_the_continuation_surprising_fails_its_perplexity_bound(llama):
    bounded = Tolerance(max_rel=10.0, min_cosine=-1.0, min_argmax=0.0, max_perplexity_ratio=1.05)
    report = gate(llama, Surprised(llama, raise_by=2.0), bounded)
    assert report.same_tokens == 1.0 and report.min_argmax == 1.0
    assert report.perplexity_ratio > 1.05
    assert len(report.failures) == 1 and "perplexity of fp32's continuation" in report.failures[0]
    unbounded = gate(
        llama,
        Surprised(llama, raise_by=2.0),
        dataclasses.replace(bounded, max_perplexity_ratio=None),
    )
    assert unbounded.passed and unbounded.perplexity_ratio == report.perplexity_ratio
    assert gate(llama, llama, Tolerance.int4()).perplexity_ratio == 1.0


def test_a_canary_leaves_perplexity_to_the_tune_and_checks_the_logits(llama, tmp_path):
    """A canary's probe is a few tokens, too short a text for a perplexity: a plan that passed
    its tune is not called stale on it, while its logits' bounds still hold it."""
    path = tmp_path / "plan.canary.pt"
    save_canary(path, Generation([prompts(rows=2)], NEW_TOKENS), llama)
    bounded = Tolerance(max_rel=10.0, min_cosine=-1.0, min_argmax=0.0, max_perplexity_ratio=1.05)
    report = check_canary(path, Surprised(llama, raise_by=2.0), bounded)
    assert report.passed, report.failures
    assert report.perplexity_ratio > 1.05
    strict = check_canary(path, Surprised(llama, raise_by=2.0), Tolerance.strict())
    assert not strict.passed and check_canary(path, llama, Tolerance.strict()).passed


def test_the_int4_preset_and_what_each_preset_admits():
    int4 = Tolerance.parse("int4")
    assert int4.name == "int4" and int4.max_perplexity_ratio == INT4_PERPLEXITY
    assert [
        t.admits_int4 for t in (Tolerance.strict(), Tolerance.bf16(), Tolerance.int8(), int4)
    ] == [False, False, False, True]
    assert int4.admits_lossy and Tolerance.int8().max_perplexity_ratio == INT8_PERPLEXITY
    with pytest.raises(AutocpuError, match=r"max_perplexity_ratio=0\.9"):
        Tolerance(max_perplexity_ratio=0.9)


def test_a_forward_tune_keys_the_presets_as_before_the_generation_bounds():
    """The generation bounds are left out of a forward plan's key, so shipped int8 plans keep
    answering, and a generation plan's key holds them."""
    before = {
        "max_rel": 0.15,
        "min_cosine": 0.99,
        "min_argmax": 0.9,
        "max_abs": None,
        "name": "int8",
    }
    assert Tolerance.int8().for_workload("forward").to_dict() == before
    assert Tolerance.int8().for_workload("generate").to_dict() == {
        **before,
        "max_perplexity_ratio": INT8_PERPLEXITY,
    }


def test_generation_tolerance_fields_leave_preset_keys_unchanged():
    for preset in (Tolerance.strict(), Tolerance.bf16(), Tolerance.int8()):
        assert "min_same_tokens" not in preset.to_dict()
    assert Tolerance.strict().same_tokens_bound == 1.0
    assert Tolerance.bf16().same_tokens_bound == 0.0
    with pytest.raises(AutocpuError, match="min_same_tokens=2"):
        Tolerance(min_same_tokens=2)


# Tuning and serving ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tuned_llama(llama, tmp_path_factory) -> autocpu.TunedModel:
    cache = tmp_path_factory.mktemp("generation-cache")
    return autocpu.tune(
        llama,
        prompts(),
        max_new_tokens=NEW_TOKENS,
        backends=["eager", "onnxruntime", "torchscript"],
        n_trials=4,
        cache_dir=cache,
    )


def test_a_causal_lm_is_tuned_on_generate_by_default(tuned_llama, llama):
    plan = tuned_llama.plan
    assert (plan.workload, plan.workload_settings) == ("generate", {"max_new_tokens": NEW_TOKENS})
    base, won = plan.baseline_generation, plan.winner_generation
    assert base.new_tokens == won.new_tokens == NEW_TOKENS
    assert 0 < base.ttft_ms < base.ttft_ms + base.tpot_ms * (NEW_TOKENS - 1)
    measured = [t for t in plan.trials if t.status == "ok" and not t.reason.startswith("stopped")]
    assert measured and all(t.generation is not None for t in measured)
    assert all(t.accuracy.same_tokens == 1.0 for t in measured)  # strict: identical tokens
    reasons = {t.backend: t.reason for t in plan.trials if t.status == "ineligible"}
    assert "no KV cache" in reasons["torchscript"]
    table = tuned_llama.explain()
    assert "TTFT ms" in table and "tokens/s" in table and "generate() of 6 new tokens" in table
    inputs = prompts(rows=1, seed=9)
    assert torch.equal(greedy(tuned_llama, inputs), greedy(llama, inputs))


def test_a_forward_plan_and_a_generate_plan_have_different_keys(llama, tmp_path):
    forward = autocpu.tune(
        llama, prompts(), workload="forward", backends=["eager"], n_trials=1, cache_dir=tmp_path
    )
    generate = autocpu.tune(
        llama, prompts(), max_new_tokens=3, backends=["eager"], n_trials=1, cache_dir=tmp_path
    )
    assert forward.plan.workload == "forward" and forward.plan.baseline_generation is None
    assert len({forward.plan.key, generate.plan.key}) == 2
    again = autocpu.tune(
        llama, prompts(), max_new_tokens=3, backends=["eager"], n_trials=1, cache_dir=tmp_path
    )
    assert again.source == "cache" and again.plan.key == generate.plan.key


def ort_plan(tuned: autocpu.TunedModel):
    """The tuned plan, switched to its best ONNX Runtime trial: a plan that is not eager."""
    plan = tuned.plan
    measured = [t for t in plan.trials if t.backend == "onnxruntime" and t.status == "ok"]
    if not measured:
        pytest.importorskip("onnxruntime")  # the legacy stack has none (optimum 1.x: its module)
    ort = min(measured, key=lambda t: t.median_ms)
    return dataclasses.replace(plan, backend=ort.backend, params=ort.params)


def test_generate_pipeline_and_streamer_run_on_the_plans_engine(tuned_llama, llama, tmp_path):
    served = autocpu.apply_plan(llama, ort_plan(tuned_llama), prompts())
    tokenizer = write_tokenizer(tmp_path / "tokenizer")
    inputs = prompts(rows=2, seed=5)
    expected = greedy(llama, inputs)
    text = tokenizer.decode(prompts()["input_ids"][0])

    class Collect(transformers.generation.streamers.BaseStreamer):
        def __init__(self) -> None:
            self.tokens: list[int] = []

        def put(self, value: torch.Tensor) -> None:
            self.tokens += value.flatten().tolist()

        def end(self) -> None:
            pass

    streamer = Collect()
    reference = transformers.pipeline("text-generation", model=llama, tokenizer=tokenizer)
    wanted = reference(text, max_new_tokens=NEW_TOKENS, do_sample=False)
    with CountingForward(llama) as counter:
        assert torch.equal(greedy(served, inputs), expected)
        single = prompts(rows=1, seed=5)
        served.generate(**single, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=streamer)
        pipe = transformers.pipeline("text-generation", model=served, tokenizer=tokenizer)
        got = pipe(text, max_new_tokens=NEW_TOKENS, do_sample=False)
        logits = served(**inputs).logits  # a generation plan answers plain forward calls too
    assert counter.calls == 0
    assert got == wanted
    assert streamer.tokens[-NEW_TOKENS:] == expected[0, -NEW_TOKENS:].tolist()
    assert torch.allclose(logits, llama(**inputs).logits, atol=1e-4)


def test_the_cached_generation_plan_is_checked_by_its_canary(tuned_llama, llama, tmp_path):
    cache = tmp_path / "cache"
    first = autocpu.tune(
        llama, prompts(), max_new_tokens=4, backends=["eager"], cache_dir=cache, n_trials=1
    )
    canary = PlanCache(cache).canary_path(first.plan.key)
    kept = torch.load(canary, weights_only=True)
    assert kept["workload"] == "generate" and kept["settings"] == {"max_new_tokens": 4}
    kept["outputs"]["sequences"][:, -1] += 1  # as if the plan's engine now generated otherwise
    torch.save(kept, canary)
    with pytest.warns(autocpu.AutocpuWarning, match="its canary failed"):
        again = autocpu.tune(
            llama, prompts(), max_new_tokens=4, backends=["eager"], cache_dir=cache, n_trials=1
        )
    assert again.source == "search"


def test_bench_times_a_generation_plan_on_generate(tuned_llama, llama):
    from autocpu.bench import bench

    result = bench(llama, prompts(), tuned_llama.plan, seconds=0.5)
    assert result.accuracy.passed and result.accuracy.same_tokens == 1.0
    assert set(result.generation) == {"baseline", "tuned"}
    assert all(
        s.new_tokens == NEW_TOKENS and s.tokens_per_s > 0 for s in result.generation.values()
    )
    assert "tokens/s (6 new tokens)" in result.summary()


def test_the_html_report_and_plans_list_say_what_a_generation_plan_delivers(tuned_llama, tmp_path):
    pytest.importorskip("matplotlib")
    from autocpu.html_report import write_report
    from autocpu.report import plans_table

    page = write_report(tuned_llama.plan, tmp_path).read_text()
    assert "generate 6" in page and "generate() of 6 new tokens: fp32 eager" in page
    assert "generate 6" in plans_table([tuned_llama.plan])


# Bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_max_new_tokens_must_be_a_whole_number_above_zero(llama, value):
    with pytest.raises(AutocpuError, match=f"max_new_tokens={value!r} is not a whole number"):
        autocpu.tune(llama, prompts(), max_new_tokens=value)


def test_generation_needs_a_model_that_generates():
    encoder = tiny_model("bert")
    with pytest.raises(AutocpuError, match="BertModel has no generate"):
        autocpu.tune(encoder, prompts(), workload="generate", backends=["eager"])


def test_prompts_longer_than_the_context_are_refused(llama):
    with pytest.raises(AutocpuError, match="exceed the model's context of 64 tokens"):
        autocpu.tune(llama, prompts(length=60), max_new_tokens=8, backends=["eager"])


# CLI -------------------------------------------------------------------------------------------


def test_cli_tunes_generation_from_a_folder(tmp_path):
    folder = tmp_path / "tiny-llama"
    tiny_model("llama", "AutoModelForCausalLM").save_pretrained(folder)
    done = run_cli(
        "tune",
        str(folder),
        "--task",
        "text-generation",
        "--prompt-len",
        "8",
        "--max-new-tokens",
        "3",
        "--backends",
        "eager",
        "--trials",
        "1",
        "--json",
        "--quiet",
        cache=tmp_path / "cache",
    )
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["workload"] == "generate" and plan["workload_settings"] == {"max_new_tokens": 3}
    assert plan["inputs"][0]["input_ids"]["shape"] == [1, 8]
    assert plan["winner_generation"]["new_tokens"] == 3
    listed = run_cli("plans", "list", cache=tmp_path / "cache")
    assert "generate 3" in listed.stdout
    bad = run_cli("tune", str(folder), "--max-new-tokens", "0", cache=tmp_path / "cache")
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1].startswith("autocpu: error: max_new_tokens=0")


# Real weights --------------------------------------------------------------------------------

REAL_PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based inks and a wooden press. Within decades "
    "printing shops had spread across Europe, and few doubt that",
    'def is_prime(n):\n    """Return True when n is a prime number."""\n',
]


@pytest.mark.slow
def test_bf16_engines_on_real_weights_pass_bf16_and_fail_strict(smollm2, tmp_path):
    """The presets' generation thresholds hold for bf16 engines on a trained model, although
    their greedy tokens leave fp32's after a few tokens, and an fp32 engine stays exact."""
    from autocpu.backends import BuildContext, get_backend
    from autocpu.hardware import probe
    from autocpu.models import make_spec

    model, tokenizer = smollm2
    batches = [dict(tokenizer(text, return_tensors="pt")) for text in REAL_PROMPTS]
    workload = Generation(batches, 24)
    references = workload.references(model)
    spec = make_spec(model)
    spec.workload = "generate"
    ctx = BuildContext(probe(), batches, tmp_path, 24)
    openvino = {"weights": "fp32", "hint": "LATENCY", "threads": 2, "streams": 1}
    candidates = {"openvino f32": ("openvino", {**openvino, "precision": "f32", "kv_cache": "f32"})}
    if probe().native_bf16:
        candidates["eager bf16"] = ("eager", {"attention": "sdpa", "precision": "bf16_weights"})
        candidates["openvino bf16"] = ("openvino", {**openvino, "precision": "bf16"})
    for label, (name, params) in candidates.items():
        backend = get_backend(name)
        runner = backend.bind(backend.build(spec, params, ctx), params)
        outputs = workload.run(runner)
        strict = workload.compare(references, outputs, Tolerance.strict())
        loose = workload.compare(references, outputs, Tolerance.bf16())
        if label == "openvino f32":
            assert strict.passed and strict.same_tokens == 1.0, strict.failures
        else:
            assert loose.passed, (label, loose.failures)
            assert not strict.passed and loose.min_argmax >= 0.95, label


def test_tune_without_inputs_makes_typical_ones_and_says_so(llama, tmp_path):
    with pytest.warns(autocpu.AutocpuWarning, match=r"no example_inputs: .*input_ids \(1, 56\)"):
        tuned = autocpu.tune(
            llama, max_new_tokens=8, backends=["eager"], n_trials=1, cache_dir=tmp_path
        )
    assert tuned.plan.inputs[0]["input_ids"] == {"shape": [1, 56], "dtype": "int64"}
    assert tuned.plan.workload == "generate"
    encoder = tiny_model("bert", "AutoModelForSequenceClassification")
    with pytest.warns(autocpu.AutocpuWarning, match="no example_inputs"):
        classifier = autocpu.tune(encoder, backends=["eager"], n_trials=1, cache_dir=tmp_path)
    assert classifier.plan.inputs[0]["input_ids"]["shape"] == [1, 64]  # its whole context
