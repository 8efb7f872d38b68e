"""The openai backend against a real local HTTP server, through the real client."""

import time

import pytest

from tasks.models.generation import BackendUnavailable, SamplingParams
from tasks.models.openai_backend import OpenAIBackend
from tasks.models.served import PROBE_IDS, PROBE_PROMPT
from tests.openai_server import OpenAIServer

PARAMS = SamplingParams(n=2, temperature=1.0, max_new_tokens=3, seed=0)


@pytest.fixture
def server():
    with OpenAIServer() as s:
        yield s


def _backend(server, **kw):
    kw.setdefault("max_retries", 3)
    kw.setdefault("timeout", 5)
    return OpenAIBackend("tiny", base_url=server.base_url, **kw)


def test_token_ids_and_logprobs_come_through(server):
    out = _backend(server).generate(["hello", "world!"], PARAMS, seeds=[[0, 1], [0, 1]])
    assert [[s.text for s in ss] for ss in out] == [["hello#0", "hello#1"], ["orld!#0", "orld!#1"]]  # each sample its seed
    assert out[0][1].token_ids == [5 + 1, 7, 8] and out[0][1].logprobs == pytest.approx([-0.1, -0.2, -0.3])
    req = next(r for r in server.behaviour.requests if r["prompt"] not in (PROBE_PROMPT, PROBE_IDS))
    assert req["logprobs"] == 1 and req["return_tokens_as_token_ids"] is True
    asked = [(r["prompt"], r["n"], r["seed"]) for r in server.behaviour.requests if r["prompt"] in ("hello", "world!")]
    assert sorted(asked) == [("hello", 1, 0), ("hello", 1, 1), ("world!", 1, 0), ("world!", 1, 1)]  # a request per sample, its seed


def test_server_without_token_ids_marks_samples(server):
    server.behaviour.no_token_ids = True
    (samples,) = _backend(server).generate(["hello"], PARAMS)
    assert all(s.token_ids == [] and s.logprobs is None and s.finish_reason == "stop" for s in samples)


def test_failing_and_rate_limited_server_retried_and_nothing_lost(server):
    b = server.behaviour
    b.fail_first, b.rate_limit_first = 1, 1  # every prompt: a 500, then a 429, then success
    prompts = [f"p{i}" for i in range(12)] + ["x ALWAYS-FAIL", "y GARBAGE"]
    out = _backend(server, concurrency=4).generate(prompts, PARAMS)
    assert len(out) == len(prompts) and all(len(ss) == 2 for ss in out)
    for p, ss in zip(prompts[:12], out[:12]):
        assert [s.finish_reason for s in ss] == ["stop", "stop"] and ss[0].text.startswith(p[-5:])
        assert b.attempts[p] == 4  # a request per sample: a 500, a 429 (the prompt's first two), then both answered
    failed = out[12]
    assert all(s.finish_reason == "error" and ("500" in s.error or "InternalServerError" in s.error) for s in failed)
    assert b.attempts["x ALWAYS-FAIL"] == 8  # (1 + max_retries) for each of its 2 samples
    assert all(s.finish_reason == "error" and s.error for s in out[13])


def test_slow_server_times_out_into_recorded_errors_with_bounded_concurrency(server):
    server.behaviour.slow_seconds = 1.5
    start = time.time()
    out = _backend(server, timeout=0.5, max_retries=1, concurrency=8).generate([f"q{i}" for i in range(6)], PARAMS)
    assert time.time() - start < 10
    assert all(s.finish_reason == "error" and "Timeout" in s.error for ss in out for s in ss)
    deadline = time.time() + 60
    while server.behaviour.in_flight and time.time() < deadline:  # the timed-out requests' server threads finish
        time.sleep(0.1)
    server.behaviour.slow_seconds, server.behaviour.most_in_flight = 0.3, 0
    out = _backend(server, timeout=5, concurrency=2).generate([f"r{i}" for i in range(6)], PARAMS)
    assert all(s.finish_reason == "stop" for ss in out for s in ss)
    assert server.behaviour.most_in_flight == 2  # 6 requests, never more than 2 at a time (the server counts them)


def test_missing_base_url_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(BackendUnavailable, match="needs `base_url`"):
        OpenAIBackend("m")


# --------------------------------------------------------------------------- scoring through prompt_logprobs


def test_score_reads_the_completion_positions_of_prompt_logprobs(server, random_checkpoint):
    from transformers import AutoTokenizer

    from tests.openai_server import fake_prompt_logprob

    backend = _backend(server)
    backend.tokenizer = AutoTokenizer.from_pretrained(str(random_checkpoint))
    prompts, completions = ["12+3=", "7*8"], [[5, 9, 4], [], [11]]
    out = backend.score(prompts + ["x"], completions, 1.0)
    for p, c, got in zip(prompts + ["x"], completions, out):
        ids = backend.tokenizer(p, add_special_tokens=False)["input_ids"] + c
        want = [fake_prompt_logprob(a, b) for a, b in zip(ids, ids[1:])][len(ids) - 1 - len(c):]
        assert got == pytest.approx(want) and len(got) == len(c)
    sent = [r for r in server.behaviour.requests if "prompt_logprobs" in r and r["prompt"] != PROBE_IDS]
    assert len(sent) == 2  # the empty completion sends nothing
    assert all(r["prompt_logprobs"] == 0 and r["max_tokens"] == 1 and isinstance(r["prompt"], list) for r in sent)


def test_score_says_why_it_cannot(server, random_checkpoint):
    from transformers import AutoTokenizer

    from tasks.models.generation import ScoringUnavailable

    backend = _backend(server)
    with pytest.raises(ScoringUnavailable, match="no local tokenizer"):
        backend.score(["a"], [[3]], 1.0)
    backend.tokenizer = AutoTokenizer.from_pretrained(str(random_checkpoint))
    with pytest.raises(ScoringUnavailable, match="temperature 0.7"):
        backend.score(["a"], [[3]], 0.7)
    server.behaviour.no_prompt_logprobs = True  # an OpenAI-compatible server that is not vLLM
    with pytest.raises(ScoringUnavailable, match="not a vLLM server"):
        backend.score(["a"], [[3]], 1.0)
    server.behaviour.no_prompt_logprobs = False
    server.behaviour.always_fail = "["  # every prompt of token ids: 500 after the client's retries
    backend.max_retries = 0
    with pytest.raises(ScoringUnavailable, match="2 of 2 scoring requests failed after retries; first: InternalServerError"):
        backend.score(["a", "b"], [[3], [4]], 1.0)


def test_guidance_stages_record_unscored_rows_instead_of_skipping(server, random_checkpoint, caplog):
    """explain/hint rows from a backend that cannot score keep null log-probs, and the reason comes back for the summary."""
    from transformers import AutoTokenizer

    from tasks.stages.explain import score_explanations
    from tasks.stages.rollouts import add_loss_logprobs

    backend = _backend(server)
    backend.tokenizer = AutoTokenizer.from_pretrained(str(random_checkpoint))
    rows = [{"loss_prompt": "1+2=", "completion_token_ids": [5, 6], "completion": "3 \\boxed{3}", "loss_logprobs": None}]
    assert add_loss_logprobs(backend, rows, 1.0) is None and len(rows[0]["loss_logprobs"]) == 2
    assert score_explanations(backend, rows, ["3"]) is None and rows[0]["explain_answer_gain"] is not None
    server.behaviour.no_prompt_logprobs = True
    fresh = [{**rows[0], "loss_logprobs": None}]
    for k in ("explain_loglik", "explain_loglik_total", "explain_answer_gain"):
        fresh[0].pop(k)
    assert "not a vLLM server" in add_loss_logprobs(backend, fresh, 1.0)
    assert "not a vLLM server" in score_explanations(backend, fresh, ["3"])
    assert fresh[0]["loss_logprobs"] is None and "explain_loglik" not in fresh[0]
    assert "without ExPO's scores" in caplog.text and "left without loss_logprobs" in caplog.text
    from tasks.stages.explain import describe

    said = describe({"unlocked_problems": 1, "stuck_problems": 2, "unlocked_fraction": 0.5, "kept": 3, "kept_with_all_steps_right": 1,
                     "unscored": 3, "scoring_unavailable": "not a vLLM server"})
    assert said.endswith("; 3 rows unscored (not a vLLM server)")
