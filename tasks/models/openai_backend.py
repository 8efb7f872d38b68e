"""The ``openai`` generation backend: the Completions endpoint of an OpenAI-compatible server
(vLLM ``serve``, SGLang, ``transformers serve``, a hosted API), with what the server does not
give computed here (tasks/models/served.py says what it gives)."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Callable

from tasks.core.interrupt import run_cancellable
from tasks.models.token_text import decode_completion, decodes_to, pieces_of, prompt_ids, token_spans
from tasks.models.generation import BackendUnavailable, Sample, SamplingParams, ScoringUnavailable
from tasks.models.sampling import default_seeds

if TYPE_CHECKING:
    from tasks.models.transformers_backend import TransformersBackend

log = logging.getLogger("guidedrl.generation")


def at_temperature_one(temperature: float, whose: str) -> None:
    """vLLM's prompt_logprobs are of the raw (temperature-1) distribution: scoring at another temperature is refused."""
    if temperature not in (0.0, 1.0):
        raise ScoringUnavailable(f"{whose} prompt_logprobs are of its temperature-1 distribution; scoring at temperature "
                                 f"{temperature} is left to the policy update")


class OpenAIBackend:
    """Completions endpoint of an OpenAI-compatible server (vLLM ``serve``, SGLang, ``transformers serve``, ...).

    What the server gives is found by a probe (tasks/models/served.py; ``capabilities``): only the fields it
    takes are sent, ``n`` becomes n requests where it answers one choice, and what it does not give is
    computed here — token ids from the policy's tokenizer (``retokenize``), scores from a forward pass of the
    local checkpoint (``local_scorer``). A request that fails after the client's retries gives samples with
    ``finish_reason`` ``error`` (never data: the stages count them apart and fail past
    `policy.max_error_fraction`)."""

    name = "openai"

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 16,
        timeout: float = 120.0,
        max_retries: int = 5,
        policy_id: str | None = None,
        capabilities=None,
    ):
        self.model = model
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        if not self.base_url:
            raise BackendUnavailable("backend openai needs `base_url` in the config or OPENAI_BASE_URL in the environment")
        self.api_key_env = api_key_env
        self.api_key = os.environ.get(api_key_env) or "EMPTY"  # local vLLM servers accept any key
        self.concurrency, self.timeout, self.max_retries = concurrency, timeout, max_retries
        self.policy_id = policy_id or f"openai:{model}"
        self._capabilities = capabilities

    tokenizer = None  # the policy's local tokenizer (policy.open_backend sets it): re-tokenizing, scoring
    local_scorer: Callable[[], "TransformersBackend"] | None = None  # the local checkpoint's forward pass (lazy)
    _scorer = None

    @property
    def capabilities(self):
        """What the server gives (probed on first use: a short request and /v1/models)."""
        if self._capabilities is None:
            from tasks.models.served import probe

            self._capabilities = probe(self.base_url, self.model, self.api_key_env, "auto", max(self.timeout, 30.0),
                                       min(self.max_retries, 3))
        return self._capabilities

    def _request(self, prompt: str, params: SamplingParams, n: int, seed: int) -> dict:
        """The request's fields: the basics and, of the optional ones, those the server takes."""
        caps = self.capabilities
        body = {"model": self.model, "prompt": prompt, "temperature": params.temperature, "top_p": params.top_p,
                "max_tokens": params.max_new_tokens}
        extra = {}
        if "n" in caps.fields:
            body["n"] = n
        if "seed" in caps.fields:
            body["seed"] = seed
        if "logprobs" in caps.fields and (caps.sampled_logprobs or caps.token_ids):
            body["logprobs"] = 1
        if "return_tokens_as_token_ids" in caps.fields:
            extra["return_tokens_as_token_ids"] = True
        return {**body, **({"extra_body": extra} if extra else {})}

    async def _one(self, client, sem, prompt: str, params: SamplingParams, index: int, seeds: list[int]) -> list[Sample]:
        caps = self.capabilities
        # one request per sample with the sample's seed (its row then depends on nothing else), unless the
        # server takes no seed and answers n choices at once: then one request for all n (no seed to send)
        calls = [(params.n, seeds[0])] if caps.n and "seed" not in caps.fields else [(1, s) for s in seeds]

        async def call(n: int, seed: int) -> list[Sample]:
            async with sem:
                try:
                    resp = await client.completions.create(**self._request(prompt, params, n, seed))
                    choices = sorted(resp.choices, key=lambda c: c.index)
                    if len(choices) != n:
                        raise ValueError(f"server returned {len(choices)} choices, asked for {n}")
                    return [self._sample(c) for c in choices]
                except Exception as exc:  # every prompt ends with a result or a recorded error
                    msg = f"{type(exc).__name__}: {exc}"[:500]
                    log.warning("prompt %d failed after retries: %s", index, msg)
                    return [Sample("", [], None, "error", msg, token_source="none") for _ in range(n)]

        groups = await asyncio.gather(*(call(n, seed) for n, seed in calls))
        return [s for g in groups for s in g]

    def _sample(self, choice) -> Sample:
        lp = getattr(choice, "logprobs", None)
        token_ids: list[int] = []
        logprobs = None
        tokens = list(getattr(lp, "tokens", None) or []) if lp is not None else []
        values = list(getattr(lp, "token_logprobs", None) or []) if lp is not None else []
        if tokens and all(isinstance(t, str) and t.startswith("token_id:") for t in tokens):
            token_ids = [int(t.split(":", 1)[1]) for t in tokens]  # vLLM's return_tokens_as_token_ids
        elif lp is not None and (getattr(lp, "model_extra", None) or {}).get("token_ids"):
            token_ids = [int(t) for t in lp.model_extra["token_ids"]]  # SGLang's logprobs.token_ids
        if token_ids and len(values) == len(token_ids):
            logprobs = [float(x) if x is not None else float("nan") for x in values]
        finish = choice.finish_reason if choice.finish_reason in ("stop", "length") else "stop"
        text = choice.text or ""
        if token_ids:
            # a server that decodes with the prompt as context writes a SentencePiece completion's first space: the row's
            # text is its ids decoded alone, as every row's is (a text that is not the ids' at all stays as the server
            # sent it: `guidedrl runs check` names such rows)
            if self.tokenizer is not None and decodes_to(self.tokenizer, token_ids, text):
                text = decode_completion(self.tokenizer, token_ids)
            return Sample(text, token_ids, logprobs, finish, token_source="server")
        return self.retokenize(text, finish, tokens, values)

    def retokenize(self, text: str, finish: str, tokens: list | None = None, values: list | None = None) -> Sample:
        """A text-only answer's token ids from the policy's tokenizer, tokenized as the update tokenizes
        (no special tokens added; the end-of-sequence token appended when the server stopped on it), and
        checked: ids that do not decode back to the text are flagged (`token_source` ``mismatch``) and left
        empty, so no update trains on tokens that were not sampled. The server's per-token log-probs are kept
        only when its tokens are these ids' tokens one for one."""
        tok = self.tokenizer
        if tok is None:
            return Sample(text, [], None, finish, token_source="none")
        ids = prompt_ids(tok, text)  # a completion's text, tokenized as a prompt is: nothing added
        decoded, spans = token_spans(tok, ids)
        if decoded != text and not decodes_to(tok, ids, text):  # decoded alone is the usual case: no second decode
            return Sample(text, [], None, finish, token_source="mismatch")
        text = decoded  # as every row's text: the ids decoded alone (a SentencePiece server's first space is the ids' `▁`)
        if finish == "stop" and tok.eos_token_id is not None:
            ids.append(tok.eos_token_id)
        logprobs = None
        # the server's token strings against what each of these ids adds to the text (a SentencePiece word's space
        # included; a byte-level BPE token inside a character adds nothing, where a server writes its bytes: no match)
        pieces = pieces_of(decoded, spans) + [""] * (len(ids) - len(spans))
        if tokens and values and len(values) == len(ids) and all(p == t for p, t in zip(pieces, tokens)):
            logprobs = [float(x) if x is not None else float("nan") for x in values]
        return Sample(text, ids, logprobs, finish, token_source="tokenizer")

    def _client(self):
        from openai import AsyncOpenAI

        return AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout, max_retries=self.max_retries)

    async def _all(self, prompts, params, seeds):
        sem = asyncio.Semaphore(self.concurrency)
        async with self._client() as client:
            return await asyncio.gather(*(self._one(client, sem, p, params, i, s) for i, (p, s) in enumerate(zip(prompts, seeds))))

    def generate(self, prompts: list[str], params: SamplingParams, seeds: list[list[int]] | None = None) -> list[list[Sample]]:
        self.capabilities  # probe before the requests: what to send
        return list(run_cancellable(self._all(prompts, params, seeds or default_seeds(params.seed, prompts, params.n))))

    async def _score_one(self, client, sem, prompt_ids: list[int], completion: list[int]) -> list[float]:
        async with sem:
            resp = await client.completions.create(model=self.model, prompt=prompt_ids + completion, max_tokens=1,
                                                   temperature=0.0, extra_body={"prompt_logprobs": 0})
        choice = resp.choices[0]
        entries = getattr(choice, "prompt_logprobs", None)
        if entries is None:
            entries = (choice.model_extra or {}).get("prompt_logprobs")
        if not isinstance(entries, list) or len(entries) != len(prompt_ids) + len(completion):
            raise ScoringUnavailable(f"the server at {self.base_url} gives no prompt_logprobs for the prompt it was sent "
                                     f"(got {type(entries).__name__}{'' if not isinstance(entries, list) else f' of {len(entries)}'}, "
                                     f"expected {len(prompt_ids) + len(completion)} entries): it is not a vLLM server")
        out = []
        for token, entry in zip(completion, entries[len(prompt_ids):]):
            hit = (entry or {}).get(str(token)) or (entry or {}).get(token)
            if hit is None:
                raise ScoringUnavailable(f"the server's prompt_logprobs have no entry for token {token}")
            out.append(float(hit["logprob"] if isinstance(hit, dict) else hit))
        return out

    async def _score_all(self, prompts, token_ids):
        sem = asyncio.Semaphore(self.concurrency)
        encoded = [prompt_ids(self.tokenizer, p) for p in prompts]
        async with self._client() as client:
            return await asyncio.gather(*(self._score_one(client, sem, p, list(c)) for p, c in zip(encoded, token_ids) if c),
                                        return_exceptions=True)

    def _local_score(self, prompts, token_ids, temperature: float, why: str) -> list[list[float]]:
        """Scores from a forward pass of the local checkpoint (the trainer's numbers), or ``ScoringUnavailable``."""
        if self.local_scorer is None:
            raise ScoringUnavailable(f"{why}; and no local checkpoint to score with (set policy.checkpoint)")
        if self._scorer is None:
            log.info("scoring with a forward pass of the local checkpoint: %s", why)
            self._scorer = self.local_scorer()
        return self._scorer.score(prompts, token_ids, temperature)

    def score(self, prompts: list[str], token_ids: list[list[int]], temperature: float = 1.0) -> list[list[float]]:
        """The completion tokens' log-probabilities under the served policy: with vLLM's ``prompt_logprobs``
        each prompt and completion is sent as one prompt of token ids (the completion "echoed" as part of the
        prompt) and the completion's positions are read back — at temperature 1 (the server's raw
        distribution). A server without them, or another temperature: a forward pass of the local checkpoint
        (`policy.checkpoint`, the weights the server was started on)."""
        if self.tokenizer is None:
            raise ScoringUnavailable("no local tokenizer to send prompts as token ids (set policy.tokenizer or policy.checkpoint)")
        if not self.capabilities.prompt_logprobs:
            return self._local_score(prompts, token_ids, temperature, f"the server at {self.base_url} gives no prompt_logprobs")
        try:
            at_temperature_one(temperature, "a server's")
        except ScoringUnavailable as exc:
            return self._local_score(prompts, token_ids, temperature, str(exc))
        results = iter(run_cancellable(self._score_all(prompts, token_ids)))
        out = [next(results) if c else [] for c in token_ids]
        failed = [r for r in out if isinstance(r, BaseException)]
        if failed:
            first = failed[0]
            if isinstance(first, ScoringUnavailable):
                raise first
            raise ScoringUnavailable(f"{len(failed)} of {len(out)} scoring requests failed after retries; first: "
                                     f"{type(first).__name__}: {str(first)[:300]}")
        return out
