"""The openai backend against a real local HTTP server, through the real client."""

import time

import pytest

from tasks.models.generation import BackendUnavailable, OpenAIBackend, SamplingParams
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
    out = _backend(server).generate(["hello", "world!"], PARAMS)
    assert [[s.text for s in ss] for ss in out] == [["hello#0", "hello#1"], ["orld!#0", "orld!#1"]]
    assert out[0][1].token_ids == [5 + 1, 7, 8] and out[0][1].logprobs == pytest.approx([-0.1, -0.2, -0.3])
    req = server.behaviour.requests[0]
    assert req["logprobs"] == 1 and req["return_tokens_as_token_ids"] is True and req["n"] == 2


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
        assert b.attempts[p] == 3
    failed = out[12]
    assert all(s.finish_reason == "error" and ("500" in s.error or "InternalServerError" in s.error) for s in failed)
    assert b.attempts["x ALWAYS-FAIL"] == 4  # 1 + max_retries
    assert all(s.finish_reason == "error" and s.error for s in out[13])


def test_slow_server_times_out_into_recorded_errors_with_bounded_concurrency(server):
    server.behaviour.slow_seconds = 1.5
    start = time.time()
    out = _backend(server, timeout=0.5, max_retries=1, concurrency=8).generate([f"q{i}" for i in range(6)], PARAMS)
    assert time.time() - start < 10
    assert all(s.finish_reason == "error" and "Timeout" in s.error for ss in out for s in ss)
    server.behaviour.slow_seconds = 0.3
    start = time.time()
    out = _backend(server, timeout=5, concurrency=2).generate([f"r{i}" for i in range(6)], PARAMS)
    assert all(s.finish_reason == "stop" for ss in out for s in ss)
    assert time.time() - start >= 0.9  # 6 requests, 2 at a time, 0.3 s each


def test_missing_base_url_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(BackendUnavailable, match="needs `base_url`"):
        OpenAIBackend("m")
