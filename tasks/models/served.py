"""What an OpenAI-compatible policy server can give, found by asking it (`policy.server`).

Servers differ in what their Completions endpoint returns beyond text:

- **vLLM** gives the sampled tokens' ids (its `return_tokens_as_token_ids` field), their
  log-probabilities (`logprobs`), honours `n` and `seed`, and gives the log-probabilities of
  a prompt's tokens (`prompt_logprobs`), which guidedrl scores completions with;
- **SGLang** gives log-probabilities and (recent releases) token ids in `logprobs.token_ids`;
- a **generic** server (`transformers serve`, llama.cpp, a hosted API) may give text only, may
  ignore `n` (one choice per request) and may refuse a field it does not know (HTTP 422).

``probe`` finds out once per stage: ``GET /v1/models`` (what the server lists, and whose it
is: vLLM and SGLang say so in `owned_by`) and a short completion request with the fields the
server's kind takes. A field the server refuses is dropped and the probe asked again
(`policy.server: auto`); where the user named the kind, it is an error naming the field and
the setting that avoids it. What cannot work at all — nothing listening, a refused key, a
model the server does not serve — is one error line before any work.

The backend (tasks/models/generation.py ``OpenAIBackend``) then sends only the fields the
probe kept and computes itself what the server did not give: token ids from the policy's
tokenizer, log-probabilities from a forward pass of the local checkpoint (``computed``).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field

import httpx

log = logging.getLogger("guidedrl.served")

#: request fields beyond the basics (model, prompt, max_tokens, temperature, top_p) that a kind of server is sent
FIELDS = {
    "vllm": ("n", "seed", "logprobs", "return_tokens_as_token_ids"),
    "sglang": ("n", "seed", "logprobs"),
    "generic": ("n", "seed", "logprobs"),
}
#: the fields without which a kind named in the config is not that kind (an error, not a fallback)
ESSENTIAL = {"vllm": ("return_tokens_as_token_ids", "logprobs"), "sglang": ("logprobs",), "generic": ()}
#: what the probe sends: a short text prompt, and a prompt of token ids to score (vLLM's prompt_logprobs)
PROBE_PROMPT, PROBE_IDS = "1 + 1 =", [1, 2, 3]


class ServerError(ValueError):
    """A policy server that cannot be used as configured (one line: the URL, what failed, what to set)."""


@dataclass(frozen=True)
class Capabilities:
    """What the server at ``url`` gave the probe, and so what guidedrl sends it and computes itself."""

    url: str
    kind: str  # vllm | sglang | generic
    fields: tuple[str, ...]  # optional request fields it accepts
    token_ids: bool  # completion token ids
    sampled_logprobs: bool  # log-probabilities of the sampled tokens
    prompt_logprobs: bool  # log-probabilities of given tokens (scoring), vLLM's prompt_logprobs
    n: bool  # answers n > 1 with n choices (else: n requests of one)
    listed: tuple[str, ...] = ()  # what /v1/models listed (may be nothing: not every server lists what it serves)
    refused: tuple[str, ...] = field(default_factory=tuple)  # fields it refused, dropped

    def gave(self) -> list[str]:
        out = ["text"]
        out += ["token ids"] if self.token_ids else []
        out += ["sampled log-probs"] if self.sampled_logprobs else []
        out += ["prompt log-probs"] if self.prompt_logprobs else []
        return out

    def computed(self) -> list[str]:
        """What guidedrl computes itself for this server."""
        out = []
        out += [] if self.token_ids else ["token ids (the policy's tokenizer)"]
        out += [] if self.sampled_logprobs else ["behaviour log-probs (the trainer's forward pass)"]
        out += [] if self.prompt_logprobs else ["scores (the local checkpoint's forward pass)"]
        out += [] if self.n else ["n samples as n requests"]
        return out

    def summary(self) -> dict:
        """For a stage's summary, the CLI table and the report."""
        return {"url": self.url, "kind": self.kind, "gave": self.gave(), "computed": self.computed(),
                **({"refused_fields": list(self.refused)} if self.refused else {})}


def headers(api_key_env: str) -> dict:
    """The request headers for the API key in the environment variable ``api_key_env`` (local servers take any)."""
    return {"Authorization": f"Bearer {os.environ.get(api_key_env) or 'EMPTY'}"}


def _message(resp: httpx.Response) -> str:
    """The error text of a server's reply (OpenAI's {"error": {"message"}}, FastAPI's {"detail"}), one line."""
    try:
        body = resp.json()
        msg = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else body.get("error") or body.get("detail") or body
    except (ValueError, AttributeError):
        msg = resp.text
    return " ".join(str(msg).split())[:300]


def _unreachable(url: str, exc: Exception) -> ServerError:
    return ServerError(f"policy server {url} is not reachable ({type(exc).__name__}: {str(exc)[:200]}); start it, or fix "
                       "policy.base_url")


def list_models(url: str, api_key_env: str, timeout: float) -> tuple[list[dict] | None, httpx.Response | None]:
    """(/v1/models entries or None when the server gives no usable list, the response)."""
    try:
        resp = httpx.get(f"{url}/models", headers=headers(api_key_env), timeout=timeout)
    except httpx.HTTPError as exc:
        raise _unreachable(url, exc) from None
    if resp.status_code in (401, 403):
        raise ServerError(f"policy server {url} refused the API key ({resp.status_code}: {_message(resp)}); set the key in the "
                          f"environment variable policy.api_key_env names ({api_key_env})")
    try:
        data = resp.json().get("data") if resp.status_code == 200 else None
    except ValueError:
        data = None
    return (list(data) if isinstance(data, list) else None), resp


def guess_kind(models: list[dict] | None) -> str:
    """vllm / sglang when /v1/models says whose it is (`owned_by`), else generic."""
    owners = {str(m.get("owned_by", "")).lower() for m in models or []}
    for kind in ("vllm", "sglang"):
        if kind in owners:
            return kind
    return "generic"


def _refused_field(message: str, sent: list[str]) -> str | None:
    """The field a 400/422 reply names among those sent (FastAPI, pydantic's extra_forbidden, vLLM's own words)."""
    for name in sent:
        if f"'{name}'" in message or f'"{name}"' in message or f"`{name}`" in message:
            return name
    return None


def _post(url: str, body: dict, api_key_env: str, timeout: float, retries: int) -> httpx.Response:
    """POST /completions through the `openai` client, so with the retry policy every request of guidedrl has (time-outs,
    dropped connections, 408, 409, 429 and 5xx; exponential backoff with jitter, ``Retry-After`` honoured). The raw
    reply: a 400 / 422 names a field the server refuses, which the probe reads."""
    import openai

    client = openai.OpenAI(base_url=url, api_key=os.environ.get(api_key_env) or "EMPTY", timeout=timeout, max_retries=retries)
    try:
        return client.post("/completions", body=body, cast_to=httpx.Response)
    except openai.APIStatusError as exc:
        return exc.response
    except openai.APIConnectionError as exc:  # time-outs too, after the retries
        raise _unreachable(url, exc) from None
    finally:
        client.close()


def probe(url: str, model: str, api_key_env: str = "OPENAI_API_KEY", server: str = "auto", timeout: float = 30.0,
          retries: int = 3) -> Capabilities:
    """What the server at ``url`` gives for ``model`` (see the module doc); ``ServerError`` where it cannot serve at all."""
    url = url.rstrip("/")
    models, _ = list_models(url, api_key_env, timeout)
    listed = tuple(str(m.get("id")) for m in models or [])
    kind = guess_kind(models) if server == "auto" else server
    fields, refused = list(FIELDS[kind]), []
    while True:
        optional = {"n": 2, "seed": 0, "logprobs": 1, "return_tokens_as_token_ids": True}
        body = {"model": model, "prompt": PROBE_PROMPT, "max_tokens": 2, "temperature": 1.0,
                **{k: v for k, v in optional.items() if k in fields}}
        resp = _post(url, body, api_key_env, timeout, retries)
        if resp.status_code == 200:
            break
        msg = _message(resp)
        if resp.status_code in (401, 403):
            raise ServerError(f"policy server {url} refused the API key ({resp.status_code}: {msg}); set the key in the "
                              f"environment variable policy.api_key_env names ({api_key_env})")
        name = _refused_field(msg, fields) if resp.status_code in (400, 422) else None
        if name is not None:
            if server != "auto" and name in ESSENTIAL[kind]:
                raise ServerError(f"policy server {url} refuses the field {name!r} ({resp.status_code}: {msg}), which "
                                  f"policy.server: {server} sends; set policy.server: auto (or generic) to send only what it takes")
            log.info("policy server %s refuses %r (%s); not sending it", url, name, msg)
            fields.remove(name)
            refused.append(name)
            continue
        if resp.status_code in (400, 404) and ("model" in msg.lower() or (listed and model not in listed)):
            shown = ", ".join(listed) if listed else "nothing at /v1/models"
            raise ServerError(f"policy server {url} does not serve model {model!r} (policy.model): {msg} — it lists {shown}")
        raise ServerError(f"policy server {url} answered the probe request with {resp.status_code}: {msg}")
    try:
        choices = resp.json().get("choices") or []
    except ValueError:
        raise ServerError(f"policy server {url} answered the probe request with a body that is not JSON: {resp.text[:200]!r}") from None
    lp = (choices[0].get("logprobs") or {}) if choices else {}
    tokens = lp.get("tokens") or []
    token_ids = bool(tokens) and all(isinstance(t, str) and t.startswith("token_id:") for t in tokens) or bool(lp.get("token_ids"))
    caps = Capabilities(url=url, kind=kind, fields=tuple(fields), token_ids=token_ids,
                        sampled_logprobs=bool(lp.get("token_logprobs")),
                        prompt_logprobs=server != "generic" and _gives_prompt_logprobs(url, model, api_key_env, timeout),
                        n="n" in fields and len(choices) == 2,
                        listed=listed, refused=tuple(refused))
    log.info("policy server %s (%s): gives %s; guidedrl computes %s", url, kind, ", ".join(caps.gave()),
             ", ".join(caps.computed()) or "nothing")
    return caps


def _gives_prompt_logprobs(url: str, model: str, api_key_env: str, timeout: float) -> bool:
    """Whether the server scores a prompt of token ids with vLLM's `prompt_logprobs` (one entry per position)."""
    body = {"model": model, "prompt": PROBE_IDS, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}
    try:
        resp = httpx.post(f"{url}/completions", json=body, headers=headers(api_key_env), timeout=timeout)
        entries = (resp.json().get("choices") or [{}])[0].get("prompt_logprobs") if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError, IndexError):
        return False
    return isinstance(entries, list) and len(entries) == 3


_CACHE: dict[tuple, Capabilities] = {}
_LOCK = threading.Lock()


def capabilities(policy, refresh: bool = False) -> Capabilities:
    """The probe's answer for a policy config (`policy.base_url`, `model`, `server`), asked once per process until
    ``forget`` (a stage's shards share it; each stage asks again: a server restarted between rounds may differ)."""
    url = (policy.base_url or os.environ.get("OPENAI_BASE_URL") or "").rstrip("/")
    key = (url, policy.model, policy.server, policy.api_key_env)
    with _LOCK:
        if refresh or key not in _CACHE:
            _CACHE[key] = probe(url, policy.model, policy.api_key_env, policy.server, max(policy.timeout_seconds, 30.0),
                                min(policy.max_retries, 3))
        return _CACHE[key]


def forget() -> None:
    with _LOCK:
        _CACHE.clear()


def describe(summary: dict | None) -> str:
    """One line: what the server gave and what guidedrl computed (for the CLI and the report)."""
    if not summary:
        return ""
    computed = "; ".join(summary.get("computed") or []) or "nothing"
    return f"server {summary.get('kind')} gave {', '.join(summary.get('gave') or [])}; guidedrl computed {computed}"
