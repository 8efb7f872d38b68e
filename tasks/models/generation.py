"""Generation backends behind one interface.

Rendered prompts and sampling parameters in; for each prompt ``n`` samples out,
each with its text, token ids, the per-token log-probabilities of the sampled
tokens under the sampling policy, and a finish reason (``stop``, ``length`` or
``error``).

- ``transformers`` (default, the test engine): batched, left-padded, prompts
  bucketed by length, seeded. Log-probabilities are those of the distribution
  actually sampled from: ``log_softmax(logits / temperature)`` after top-p.
- ``openai``: any OpenAI-compatible server (vLLM, SGLang, a hosted API) through
  the ``openai`` client's Completions endpoint; async, bounded concurrency, the
  client's retries with exponential backoff on rate limits, 5xx and time-outs.
  Token ids come from vLLM's ``return_tokens_as_token_ids``; a server that does
  not give ids or log-probabilities yields samples with empty
  ``token_ids``/``logprobs=None``, which the policy update leaves out.
- ``vllm``: in-process ``vllm.LLM``, imported lazily; not part of the default
  install (vLLM pins its own torch and transformers).

Each also has ``score``: the log-probabilities of given completion tokens after given
prompts (a forward pass; for the served and vLLM backends, vLLM's ``prompt_logprobs`` over
prompt + completion), or ``ScoringUnavailable`` with the reason it cannot.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from tasks.core.interrupt import run_cancellable
from tasks.core.store import fingerprint_files

log = logging.getLogger("guidedrl.generation")


class BackendUnavailable(RuntimeError):
    """A backend whose dependencies are not installed or not configured."""


class ScoringUnavailable(RuntimeError):
    """A backend that cannot give log-probabilities of given tokens (its reason is the message):
    the stage records that its rows are unscored, and why, instead of skipping silently."""


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 160
    seed: int = 0


@dataclass
class Sample:
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str  # 'stop' | 'length' | 'error'
    error: str | None = None
    #: where token_ids came from: engine (in process) | server | tokenizer (re-tokenized text) | mismatch (re-tokenized
    #: ids that do not decode back to the text: left empty) | none (no tokenizer to re-tokenize with)
    token_source: str = "engine"


class GenerationBackend(Protocol):
    name: str
    policy_id: str

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Sample]]:
        """``n`` samples for each prompt, in prompt order."""

    def score(self, prompts: list[str], token_ids: list[list[int]], temperature: float = 1.0) -> list[list[float]]:
        """Per-token log-probabilities of given completion tokens after given prompts; raises
        ``ScoringUnavailable`` where the backend cannot."""


def checkpoint_fingerprint(path: Path | str) -> str:
    """policy_id of a local checkpoint: the sha256 of its weight and config files."""
    path = Path(path)
    names = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt"}
    files = [p for p in path.iterdir() if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name in names)]
    if not files:
        raise FileNotFoundError(f"{path}: no checkpoint files (expected a Hugging Face model directory)")
    return "ckpt-" + fingerprint_files(files).removeprefix("sha256:")[:16]


# --------------------------------------------------------------------------- transformers


def attention_implementation(device: str, dtype: str) -> str:
    """The attention kernels transformers is asked for: FlashAttention-2 for bfloat16 weights on a GPU when the
    `flash_attn` package is installed, else PyTorch's SDPA (which itself picks its flash / memory-efficient
    kernels on a GPU). Nothing hand-written."""
    import importlib.util

    if str(device).startswith("cuda") and dtype == "bfloat16" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


class TransformersBackend:
    name = "transformers"

    def __init__(self, model: str | Path, batch_size: int = 64, device: str = "cpu", threads: int | None = None, dtype: str = "float32",
                 batch_tokens: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(model)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: policy checkpoint directory not found (models are loaded from disk, never from a hub)")
        if threads:
            torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype),
                                                          attn_implementation=attention_implementation(device, dtype)).to(device).eval()
        self.device = device
        self.batch_size, self.batch_tokens = batch_size, batch_tokens
        self.policy_id = checkpoint_fingerprint(path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @classmethod
    def from_objects(cls, model, tokenizer, policy_id: str, batch_size: int = 64) -> "TransformersBackend":
        """Wrap an in-memory model (tests, the training loop) without loading from disk."""
        self = cls.__new__(cls)
        self.model, self.tokenizer, self.policy_id = model.eval(), tokenizer, policy_id
        self.tokenizer.padding_side = "left"
        self.device, self.batch_size, self.batch_tokens = next(model.parameters()).device, batch_size, None
        return self

    oom_backoffs = 0  # batches split in two after running out of device memory

    def _batch_end(self, lengths: list[int], start: int, extra: int) -> int:
        """The end of the batch that starts at ``start``: at most `batch_size` sequences and, with
        `batch_tokens`, at most that many padded tokens (``lengths`` + ``extra`` each)."""
        stop = min(len(lengths), start + self.batch_size)
        if self.batch_tokens:
            while stop - start > 1 and (max(lengths[start:stop]) + extra) * (stop - start) > self.batch_tokens:
                stop -= 1
        return stop

    def _run_batches(self, lengths: list[int], extra: int, run: Callable[[int, int], None], what: str) -> None:
        """``run(start, stop)`` over consecutive batches of the items. Out of device memory, the batch is
        retried at half its size (down to one sequence), the smaller size kept for the rest of this
        backend's work, and a warning says so."""
        import torch

        start = 0
        while start < len(lengths):
            stop = self._batch_end(lengths, start, extra)
            try:
                run(start, stop)
            except torch.OutOfMemoryError:
                if stop - start == 1:
                    raise
                if str(self.device).startswith("cuda"):
                    torch.cuda.empty_cache()
                self.oom_backoffs += 1
                self.batch_size = (stop - start) // 2
                log.warning("%s: out of device memory at %d sequences of up to %d tokens; retrying with batches of %d "
                            "(policy.batch_size / batch_tokens lower avoid it)", what, stop - start, max(lengths[start:stop]) + extra,
                            self.batch_size)
                continue
            start = stop

    _lock = threading.Lock()  # seeding is global in torch: one generate at a time per process keeps runs reproducible

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Sample]]:
        with self._lock:
            return self._generate(prompts, params)

    def _generate(self, prompts: list[str], params: SamplingParams) -> list[list[Sample]]:
        import torch

        tok = self.tokenizer
        encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        jobs = [(i, j) for i in range(len(prompts)) for j in range(params.n)]
        jobs.sort(key=lambda ij: (len(encoded[ij[0]]), ij))  # bucket by prompt length
        results: list[list[Sample | None]] = [[None] * params.n for _ in prompts]
        eos = tok.eos_token_id

        def run(b: int, stop: int) -> None:
            chunk = jobs[b:stop]
            width = max(len(encoded[i]) for i, _ in chunk)
            pad = tok.pad_token_id
            ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i, _ in chunk], device=self.device)
            mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i, _ in chunk], device=self.device)
            torch.manual_seed(params.seed * 1_000_003 + b)
            sample = params.temperature > 0
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=sample,
                    temperature=params.temperature if sample else None,
                    top_p=params.top_p if sample else None,
                    top_k=0 if sample else None,
                    max_new_tokens=params.max_new_tokens,
                    output_scores=True,
                    return_dict_in_generate=True,
                    pad_token_id=pad,
                    eos_token_id=eos,
                )
            new = out.sequences[:, width:]
            scores = torch.stack(out.scores, dim=1).float()  # (B, T, V): processed logits actually sampled from
            logp = torch.log_softmax(scores, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
            for row, (i, j) in enumerate(chunk):
                toks = new[row].tolist()
                if eos in toks:
                    end, reason = toks.index(eos) + 1, "stop"
                else:
                    end, reason = len(toks), "length"
                token_ids = toks[:end]
                results[i][j] = Sample(
                    text=tok.decode(token_ids, skip_special_tokens=True),
                    token_ids=token_ids,
                    logprobs=[float(x) for x in logp[row, :end].tolist()],
                    finish_reason=reason,
                )

        self._run_batches([len(encoded[i]) for i, _ in jobs], params.max_new_tokens, run, "generate")
        return results  # type: ignore[return-value]


    def score(self, prompts: list[str], token_ids: list[list[int]], temperature: float = 1.0) -> list[list[float]]:
        """Per-token log-probabilities of given completion tokens under given prompts:
        ``log_softmax(logits / temperature)`` of a forward pass (what the loss side of
        a guided sample uses: the same tokens under the prompt *without* the guidance)."""
        import torch

        tok = self.tokenizer
        out: list[list[float]] = []
        t = temperature if temperature > 0 else 1.0
        encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]

        def run(b: int, stop: int) -> None:
            ps, cs = encoded[b:stop], token_ids[b:stop]
            seqs = [p + c for p, c in zip(ps, cs)]
            width = max(len(x) for x in seqs)
            ids = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in seqs], device=self.device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in seqs], device=self.device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float() / t
            logp = torch.log_softmax(logits, dim=-1)
            for row, (p, c) in enumerate(zip(ps, cs)):
                start = width - len(c)  # first completion position; predicted from the one before
                picked = logp[row, start - 1 : width - 1].gather(-1, torch.tensor(c, device=self.device)[:, None]).squeeze(-1)
                out.append([float(x) for x in picked.tolist()])

        self._run_batches([len(p) + len(c) for p, c in zip(encoded, token_ids)], 0, run, "score")
        return out


# --------------------------------------------------------------------------- openai-compatible servers


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

    async def _one(self, client, sem, prompt: str, params: SamplingParams, index: int) -> list[Sample]:
        caps = self.capabilities
        # a server that answers one choice per request gets n requests, each with its own seed
        calls = [(params.n, params.seed + index)] if caps.n or params.n == 1 else \
            [(1, (params.seed + index) * 1_000_003 + j) for j in range(params.n)]

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
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        if tok.decode(ids, skip_special_tokens=True) != text:
            return Sample(text, [], None, finish, token_source="mismatch")
        if finish == "stop" and tok.eos_token_id is not None:
            ids.append(tok.eos_token_id)
        logprobs = None
        if tokens and values and len(values) == len(ids) and all(tok.decode([i]) == t for i, t in zip(ids, tokens)):
            logprobs = [float(x) if x is not None else float("nan") for x in values]
        return Sample(text, ids, logprobs, finish, token_source="tokenizer")

    def _client(self):
        from openai import AsyncOpenAI

        return AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout, max_retries=self.max_retries)

    async def _all(self, prompts, params):
        sem = asyncio.Semaphore(self.concurrency)
        async with self._client() as client:
            return await asyncio.gather(*(self._one(client, sem, p, params, i) for i, p in enumerate(prompts)))

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Sample]]:
        self.capabilities  # probe before the requests: what to send
        return list(run_cancellable(self._all(prompts, params)))

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
        encoded = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
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


# --------------------------------------------------------------------------- in-process vLLM (optional)


class VLLMBackend:
    """In-process ``vllm.LLM``: for a GPU environment built around vLLM."""

    name = "vllm"

    def __init__(self, model: str | Path, **engine_kwargs):
        try:
            import vllm  # noqa: F401  (optional dependency, imported only here)
        except ImportError:
            raise BackendUnavailable(
                "backend vllm needs the `vllm` package, which is not installed here. vLLM pins its own torch and "
                "transformers, so install it in a separate GPU environment, or run `vllm serve MODEL` there and use "
                "`backend: openai` with its base_url (see infra/)."
            ) from None
        self._vllm = vllm
        self.llm = vllm.LLM(model=str(model), **engine_kwargs)
        self.policy_id = checkpoint_fingerprint(model) if Path(model).is_dir() else f"vllm:{model}"

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Sample]]:
        sp = self._vllm.SamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_new_tokens,
            seed=params.seed,
            logprobs=0,  # the sampled token's log-probability only
        )
        outputs = self.llm.generate(prompts, sp)
        results = []
        for out in outputs:
            samples = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lps = [float(step[t].logprob) for step, t in zip(c.logprobs, ids)] if c.logprobs else None
                samples.append(Sample(c.text, ids, lps, c.finish_reason if c.finish_reason in ("stop", "length") else "stop"))
            results.append(samples)
        return results

    def score(self, prompts: list[str], token_ids: list[list[int]], temperature: float = 1.0) -> list[list[float]]:
        """Completion tokens' log-probabilities from the engine's ``prompt_logprobs`` over prompt + completion
        token ids (temperature 1: vLLM's prompt log-probabilities are of the raw distribution)."""
        at_temperature_one(temperature, "vLLM's")
        tok = self.llm.get_tokenizer()
        encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        todo = [(k, p, list(c)) for k, (p, c) in enumerate(zip(encoded, token_ids)) if c]
        sp = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outputs = self.llm.generate([{"prompt_token_ids": p + c} for _, p, c in todo], sp) if todo else []
        out: list[list[float]] = [[] for _ in prompts]
        for (k, p, c), o in zip(todo, outputs):
            out[k] = [float(entry[t].logprob) for entry, t in zip(o.prompt_logprobs[len(p):], c)]
        return out


def make_backend(backend: str, model: str, **options) -> GenerationBackend:
    """The backend named in config (``transformers`` | ``openai`` | ``vllm``)."""
    if backend == "transformers":
        return TransformersBackend(model, **options)
    if backend == "openai":
        return OpenAIBackend(model, **options)
    if backend == "vllm":
        return VLLMBackend(model, **options)
    raise ValueError(f"unknown generation backend {backend!r}; allowed: transformers, openai, vllm")
