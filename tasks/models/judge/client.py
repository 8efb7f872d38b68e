"""The LLM judge's client: chat completions through the `openai` client against any OpenAI-compatible endpoint, async
with bounded concurrency, the client's own retries (exponential backoff with jitter on 429, 5xx, time-outs and dropped
connections; ``Retry-After`` honoured), a per-request time-out, a spending guard, and every request/response pair
cached on disk by (model, messages, sampling parameters), so a re-run pays only for what is missing."""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tasks.core.interrupt import run_cancellable
from tasks.models.judge.traces import JudgeError

log = logging.getLogger("guidedrl.judge")


# --------------------------------------------------------------------------- the request cache


class RequestCache:
    """Judge answers on disk, one JSON file per (model, messages, sampling parameters)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @staticmethod
    def key(model: str, messages: list[dict], params: dict) -> str:
        blob = json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        try:
            return json.loads(self._path(key).read_text())["content"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return None

    def put(self, key: str, record: dict) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{id(record)}")
        tmp.write_text(json.dumps(record, ensure_ascii=False))
        tmp.replace(path)  # atomic: a reader sees the whole answer or none


@dataclass
class Reply:
    content: str | None
    error: str | None = None
    cached: bool = False


class JudgeClient:
    """Chat completions through the `openai` client, cached, bounded, retried."""

    def __init__(self, model: str | None, base_url: str | None, api_key_env: str, cache: RequestCache, *,
                 temperature: float = 0.0, max_tokens: int = 1024, concurrency: int = 16, timeout: float = 60.0,
                 max_retries: int = 5, max_requests: int | None = None):
        self.model = model or os.environ.get("OPENAI_MODEL")
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        if not self.model or not self.base_url:
            raise JudgeError("judge.backend openai needs `judge.model` and `judge.base_url` in the config "
                             "(or OPENAI_MODEL and OPENAI_BASE_URL in the environment)")
        self.api_key_env = api_key_env
        self.cache = cache
        self.params = {"temperature": temperature, "max_tokens": max_tokens}
        self.concurrency, self.timeout, self.max_retries = concurrency, timeout, max_retries
        self.max_requests = max_requests
        self.stats: Counter = Counter()  # requests, cache_hits, retries, failed
        importlib.import_module("openai")  # imported here, once, not inside the first batch of requests

    def key(self, messages: list[dict]) -> str:
        return RequestCache.key(self.model, messages, self.params)

    def complete(self, batch: list[list[dict]]) -> list[Reply]:
        """One reply per message list, from the cache where it is there."""
        replies: list[Reply | None] = []
        todo = []
        for i, messages in enumerate(batch):
            hit = self.cache.get(self.key(messages))
            if hit is not None:
                self.stats["cache_hits"] += 1
                replies.append(Reply(hit, cached=True))
            else:
                replies.append(None)
                todo.append(i)
        if todo:
            if self.max_requests is not None and self.stats["requests"] + len(todo) > self.max_requests:
                raise JudgeError(f"the judge would send {len(todo)} requests (plus {self.stats['requests']} already sent), over "
                                 f"judge.max_requests = {self.max_requests}; nothing was sent. Raise the limit or grade fewer traces.")
            for i, reply in zip(todo, run_cancellable(self._send_all([batch[i] for i in todo]))):
                replies[i] = reply
        return replies  # type: ignore[return-value]

    async def _send_all(self, batch: list[list[dict]]) -> list[Reply]:
        from openai import AsyncOpenAI, DefaultAsyncHttpxClient

        api_key = os.environ.get(self.api_key_env)
        if not api_key and not self.stats["requests"]:
            log.warning("judge: $%s is not set; sending no key (fine for a local vLLM server)", self.api_key_env)
        attempts = Counter()

        async def on_request(request):  # every HTTP attempt, retries included
            attempts["n"] += 1

        sem = asyncio.Semaphore(self.concurrency)
        http = DefaultAsyncHttpxClient(event_hooks={"request": [on_request]})
        async with AsyncOpenAI(base_url=self.base_url, api_key=api_key or "EMPTY", timeout=self.timeout,
                               max_retries=self.max_retries, http_client=http) as client:
            replies = await asyncio.gather(*(self._one(client, sem, m) for m in batch))
        self.stats["requests"] += len(batch)
        self.stats["retries"] += max(0, attempts["n"] - len(batch))
        return list(replies)

    async def _one(self, client, sem: asyncio.Semaphore, messages: list[dict]) -> Reply:
        async with sem:
            try:
                # the raw response: the client's retries and errors, without building pydantic
                # models of the reply (that parsing is most of the client's CPU time per request)
                raw = await client.chat.completions.with_raw_response.create(model=self.model, messages=messages, **self.params)
                body = raw.http_response.json()
                choices = body.get("choices") or []
                content = (choices[0].get("message") or {}).get("content") if choices else None
                if not isinstance(content, str):
                    raise ValueError(f"the reply has no message content: {str(body)[:200]}")
            except Exception as exc:  # every request ends answered or with its reason
                self.stats["failed"] += 1
                return Reply(None, error=f"{type(exc).__name__}: {exc}"[:300])
        usage = body.get("usage")
        record = {"model": self.model, "messages": messages, "params": self.params, "content": content, "usage": usage,
                  "created": time.time()}
        await asyncio.to_thread(self.cache.put, self.key(messages), record)  # on disk before the answer is used
        return Reply(content)


def estimate_tokens(text: str) -> int:
    """Roughly four characters a token: enough for a spending estimate."""
    return (len(text) + 3) // 4


def request_plan(client: JudgeClient, texts: list[str]) -> dict:
    """How many of these first requests are not cached, and roughly how many tokens they would send."""
    missing = [t for t in texts if client.cache.get(client.key([{"role": "user", "content": t}])) is None]
    return {"requests": len(missing), "cached": len(texts) - len(missing),
            "prompt_tokens": sum(estimate_tokens(t) for t in missing),
            "max_completion_tokens": len(missing) * client.params["max_tokens"],
            "max_requests": client.max_requests, "endpoint": f"{client.base_url} ({client.model})"}


def open_client(config, workspace: Path) -> JudgeClient:
    """The judge client of ``config.judge``, caching under ``<workspace>/cache/judge``."""
    jc = config.judge
    return JudgeClient(jc.model, jc.base_url, jc.api_key_env, RequestCache(Path(workspace) / "cache" / "judge"),
                       temperature=jc.temperature, max_tokens=jc.max_tokens, concurrency=jc.concurrency,
                       timeout=jc.timeout_seconds, max_retries=jc.max_retries, max_requests=jc.max_requests)


def check_failures(stage: str, rows: list[dict], max_failed_fraction: float, client: JudgeClient) -> None:
    """Fail the stage when more requests failed (after retries) than allowed;
    what was answered stays cached, so the re-run sends only the rest."""
    failed = [r for r in rows if (r.get("error") or "").startswith("request failed")]
    if rows and len(failed) > max_failed_fraction * len(rows):
        reasons = Counter(r["error"].removeprefix("request failed: ")[:80] for r in failed).most_common(3)
        raise JudgeError(f"{stage}: {len(failed)} of {len(rows)} judge requests to {client.base_url} failed after "
                         f"{client.max_retries} retries ({', '.join(f'{n}x {why}' for why, n in reasons)}); the answers received "
                         f"are cached under {client.cache.root}, a re-run sends only the missing requests "
                         f"(judge.max_failed_fraction = {max_failed_fraction})")
