import math
import sys
import types

import pytest
import torch

from tasks.models.generation import BackendUnavailable, SamplingParams
from tasks.models.transformers_backend import TransformersBackend
from tasks.models.vllm_backend import VLLMBackend
from tasks.models.prompts import chat
from tasks.models.tiny_policy import TinyPolicyConfig, build_model, build_tokenizer


@pytest.fixture(scope="module")
def tiny():
    tok = build_tokenizer()
    model = build_model(TinyPolicyConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2), tok)
    return TransformersBackend.from_objects(model, tok, "random-tiny", batch_size=5)


PROMPTS = ["1 + 2 =", "a much longer prompt: 12 + 34 - 5 =", "7 - 3 =\n"]


def test_logprobs_agree_with_a_fresh_forward_pass(tiny):
    """Recorded per-token log-probs = log_softmax(logits / T) of a fresh forward pass (tolerance 1e-4)."""
    params = SamplingParams(n=3, temperature=0.7, max_new_tokens=12, seed=1)
    prompts = [chat(tiny.tokenizer, p) for p in PROMPTS]
    out = tiny.generate(prompts, params)
    assert [len(s) for s in out] == [3, 3, 3]
    checked = 0
    for prompt, samples in zip(prompts, out):
        p_ids = tiny.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for s in samples:
            assert len(s.token_ids) == len(s.logprobs) > 0
            assert s.finish_reason in ("stop", "length")
            if s.finish_reason == "length":
                assert len(s.token_ids) == params.max_new_tokens
            ids = torch.tensor([p_ids + s.token_ids])
            with torch.no_grad():
                logits = tiny.model(ids).logits[0, len(p_ids) - 1 : -1] / params.temperature
            ref = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(s.token_ids)[:, None]).squeeze(-1)
            assert torch.allclose(torch.tensor(s.logprobs), ref, atol=1e-4), (s.logprobs, ref.tolist())
            checked += 1
    assert checked == 9


def test_same_seed_same_samples_other_seed_other_samples(tiny):
    prompts = [chat(tiny.tokenizer, p) for p in PROMPTS]
    a = tiny.generate(prompts, SamplingParams(n=2, max_new_tokens=10, seed=3))
    b = tiny.generate(prompts, SamplingParams(n=2, max_new_tokens=10, seed=3))
    c = tiny.generate(prompts, SamplingParams(n=2, max_new_tokens=10, seed=4))
    text = lambda r: [s.text for ss in r for s in ss]
    assert text(a) == text(b) and text(a) != text(c)


def test_greedy_is_deterministic_and_its_logprobs_are_the_max(tiny):
    prompts = [chat(tiny.tokenizer, PROMPTS[0])]
    (samples,) = tiny.generate(prompts, SamplingParams(n=2, temperature=0, max_new_tokens=6))
    assert samples[0].token_ids == samples[1].token_ids
    assert all(lp <= 0 and not math.isnan(lp) for lp in samples[0].logprobs)


def test_vllm_backend_says_clearly_when_vllm_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(BackendUnavailable, match="needs the `vllm` package.*backend: openai"):
        VLLMBackend("some/model")


def test_vllm_adapter_against_a_stand_in_module(monkeypatch):
    """The adapter speaks vLLM's documented LLM.generate / SamplingParams / RequestOutput shapes: one request per
    sample, each with its own seed."""
    seen = {"sampling": []}

    class SamplingParamsStub:
        def __init__(self, **kw):
            self.kw = kw

    class Logprob:
        def __init__(self, logprob):
            self.logprob = logprob

    class LLMStub:
        def __init__(self, model, **kw):
            seen["model"], seen["engine"] = model, kw

        def generate(self, prompts, sps):
            assert len(prompts) == len(sps)
            outs = []
            for k, (p, sp) in enumerate(zip(prompts, sps)):
                seen["sampling"].append(sp.kw)
                i = sp.kw["seed"] % 2
                comps = [types.SimpleNamespace(index=0, text=f"{p}->{sp.kw['seed']}", token_ids=[5 + i, 6],
                                               logprobs=[{5 + i: Logprob(-0.5), 99: Logprob(-3.0)}, {6: Logprob(-0.25)}],
                                               finish_reason="length" if k % 2 else "stop")]
                outs.append(types.SimpleNamespace(prompt=p, outputs=comps))
            return outs

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLMStub, SamplingParams=SamplingParamsStub))
    be = VLLMBackend("org/model", tensor_parallel_size=2)
    out = be.generate(["a", "b"], SamplingParams(n=2, temperature=0.8, max_new_tokens=7), seeds=[[10, 11], [20, 21]])
    assert seen["model"] == "org/model" and seen["engine"] == {"tensor_parallel_size": 2}
    assert seen["sampling"] == [{"n": 1, "temperature": 0.8, "top_p": 1.0, "max_tokens": 7, "seed": s, "logprobs": 0}
                                for s in (10, 11, 20, 21)]
    assert [[s.text for s in ss] for ss in out] == [["a->10", "a->11"], ["b->20", "b->21"]]
    assert out[0][1].token_ids == [6, 6] and out[0][1].logprobs == [-0.5, -0.25]
    assert [s.finish_reason for s in out[1]] == ["stop", "length"]
    assert be.policy_id == "vllm:org/model"


def test_score_matches_the_sampling_logprobs_under_the_same_prompt(tiny):
    """score() over the prompt a sample was drawn from gives back its behaviour log-probs (1e-4)."""
    prompts = [chat(tiny.tokenizer, p) for p in PROMPTS]
    params = SamplingParams(n=2, temperature=0.9, max_new_tokens=10, seed=5)
    out = tiny.generate(prompts, params)
    flat_prompts = [p for p, ss in zip(prompts, out) for _ in ss]
    flat = [s for ss in out for s in ss]
    scored = tiny.score(flat_prompts, [s.token_ids for s in flat], temperature=0.9)
    for s, lp in zip(flat, scored):
        assert torch.allclose(torch.tensor(lp), torch.tensor(s.logprobs), atol=1e-4)
    other = tiny.score([prompts[0]] * len(flat), [s.token_ids for s in flat], temperature=0.9)
    assert any(not torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-3) for a, b in zip(other, scored))


class _Limited:
    """The tiny model behind a device that runs out of memory above ``most`` sequences per pass."""

    def __init__(self, model, most: int):
        self.model, self.most, self.batches = model, most, []

    def _check(self, ids):
        self.batches.append(tuple(ids.shape))
        if ids.shape[0] > self.most:
            raise torch.OutOfMemoryError(f"CUDA out of memory (stand-in: {ids.shape[0]} > {self.most} sequences)")

    def __call__(self, input_ids, **kw):
        if kw.get("past_key_values") is None:  # a batch's first pass (generation) or its only one (scoring)
            self._check(input_ids)
        return self.model(input_ids=input_ids, **kw)


def _backend(most: int | None = None, batch_size: int = 8, batch_tokens: int | None = None):
    tok = build_tokenizer()
    model = build_model(TinyPolicyConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2), tok)
    backend = TransformersBackend.from_objects(model, tok, "random-tiny", batch_size=batch_size)
    backend.batch_tokens = batch_tokens
    backend.model = _Limited(model, most if most is not None else 10**9)
    return backend


def test_batches_by_tokens_wide_for_short_prompts_narrow_for_long_ones():
    backend = _backend(batch_size=16, batch_tokens=400)
    prompts = ["1+2="] * 3 + ["a much, much longer prompt than the others: 12 + 34 - 5 + 6 - 7 ="] * 3
    out = backend.generate(prompts, SamplingParams(n=2, max_new_tokens=6, seed=1))
    assert all(len(ss) == 2 and all(s.token_ids for s in ss) for ss in out)
    assert all(n * width <= 400 - 6 for n, width in backend.model.batches)  # prompt width + 6 new tokens each
    sizes = [n for n, _ in backend.model.batches]
    assert sizes[0] == 6 and max(sizes[1:]) < 6  # the short prompts in one batch; the long ones split
    assert sum(sizes) == 12


def test_out_of_memory_retries_smaller_batches_and_says_so(caplog):
    prompts = [f"{a} + {a + 3} =" for a in range(5)]
    params = SamplingParams(n=2, max_new_tokens=5, seed=3)
    backend = _backend(most=3)
    out = backend.generate(prompts, params)
    assert all(len(ss) == 2 and all(s.token_ids and s.logprobs for s in ss) for ss in out)  # every sample, none lost
    assert backend.oom_backoffs == 2 and backend.batch_size == 2  # 8 -> 4 -> 2, kept for the rest
    assert [n for n, _ in backend.model.batches] == [8, 4, 2, 2, 2, 2, 2]
    assert "out of device memory at 8 sequences" in caplog.text and "retrying with batches of 4" in caplog.text
    flat = [(p, s.token_ids) for p, ss in zip(prompts, out) for s in ss]
    scored = backend.score([p for p, _ in flat], [t for _, t in flat], 1.0)  # scoring keeps the smaller batches
    whole = _backend().score([p for p, _ in flat], [t for _, t in flat], 1.0)
    assert all(torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5) for a, b in zip(scored, whole))
    single = _backend(most=0)
    with pytest.raises(torch.OutOfMemoryError):  # one sequence that does not fit is an error, not a loop
        single.generate(prompts[:1], SamplingParams(n=1, max_new_tokens=2))


def test_vllm_scoring_reads_prompt_logprobs_of_the_completion(monkeypatch):
    """The in-process vLLM backend scores through prompt_logprobs over prompt + completion token ids."""
    seen = {}

    class Logprob:
        def __init__(self, logprob):
            self.logprob = logprob

    class LLMStub:
        def __init__(self, model, **kw):
            pass

        def get_tokenizer(self):
            return lambda text, add_special_tokens=False: {"input_ids": [ord(c) % 50 for c in text]}

        def generate(self, prompts, sp):
            seen["prompts"], seen["sampling"] = prompts, sp
            return [types.SimpleNamespace(prompt_logprobs=[None] + [{t: Logprob(-t / 100)} for t in p["prompt_token_ids"][1:]])
                    for p in prompts]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLMStub, SamplingParams=lambda **kw: kw))
    be = VLLMBackend("org/model")
    out = be.score(["ab", "c"], [[7, 8], []], 1.0)
    assert out == [[-0.07, -0.08], []]
    assert seen["prompts"] == [{"prompt_token_ids": [97 % 50, 98 % 50, 7, 8]}]
    assert seen["sampling"] == {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}


def test_attention_kernels_are_the_ones_transformers_offers(monkeypatch, random_checkpoint):
    import importlib.util

    from tasks.models.transformers_backend import attention_implementation

    assert attention_implementation("cpu", "float32") == "sdpa" and attention_implementation("cuda", "bfloat16") in ("sdpa", "flash_attention_2")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(name, *a))
    assert attention_implementation("cuda:1", "bfloat16") == "flash_attention_2"
    assert attention_implementation("cuda", "float32") == "sdpa" and attention_implementation("cpu", "bfloat16") == "sdpa"
    monkeypatch.undo()
    backend = TransformersBackend(random_checkpoint, device="cpu")
    assert backend.model.config._attn_implementation == "sdpa"


def test_a_row_does_not_depend_on_its_batch_mates(tiny):
    """Each row is drawn from its own seeded stream: a problem sampled alone, with short or long batch-mates, in a
    batch of 2 or of 5, gives the same texts (log-probs within 1e-4); another seed gives other texts."""
    from tasks.models.sampling import sample_seeds

    params = SamplingParams(n=3, temperature=1.0, top_p=0.95, max_new_tokens=14)
    target = chat(tiny.tokenizer, "5 + 6 - 2 =")
    seeds = sample_seeds(0, "p-5", 3)
    alone = tiny.generate([target], params, [seeds])[0]
    mates = [chat(tiny.tokenizer, q) for q in ("1=", "a much longer prompt than the target one: 12 + 34 - 5 + 6 =", "77 - 3 =")]
    for batch in ([mates[1], target], [mates[0], target, mates[2]], mates[::-1] + [target]):
        out = tiny.generate(batch, params, [sample_seeds(0, f"m{k}", 3) if p != target else seeds for k, p in enumerate(batch)])
        got = out[batch.index(target)]
        assert [s.text for s in got] == [s.text for s in alone]
        for a, b in zip(got, alone):
            assert a.token_ids == b.token_ids
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)
    other = tiny.generate([target], params, [sample_seeds(1, "p-5", 3)])[0]
    assert [s.token_ids for s in other] != [s.token_ids for s in alone]


def test_sample_seeds_depend_on_problem_index_kind_and_seed_only():
    from tasks.models.sampling import SEED_RANGE, sample_seed, sample_seeds

    s = sample_seeds(0, "prob-a", 4)
    assert s == [sample_seed(0, "prob-a", j, "plain") for j in range(4)] and len(set(s)) == 4
    assert all(0 <= x < SEED_RANGE for x in s)
    assert sample_seed(0, "prob-a", 0, "hint") != s[0] and sample_seed(1, "prob-a", 0) != s[0] and sample_seed(0, "prob-b", 0) != s[0]
