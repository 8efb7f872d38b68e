"""Generation backends behind one interface.

Rendered prompts, sampling parameters and per-sample seeds in (``seeds[i][j]``: sample ``j`` of
prompt ``i``, tasks/models/sampling.py ``sample_seed``; a row depends on its seed, not on its
batch-mates); for each prompt ``n`` samples out,
each with its text, token ids, the per-token log-probabilities of the sampled
tokens under the sampling policy, and a finish reason (``stop``, ``length`` or
``error``).

- ``transformers`` (default, the test engine; tasks/models/transformers_backend.py):
  batched, left-padded, prompts bucketed by length, each row drawn from its own
  seeded stream (tasks/models/sampling.py). Log-probabilities are those of the
  distribution actually sampled from: ``log_softmax(logits / temperature)`` after top-p.
- ``openai`` (tasks/models/openai_backend.py): any OpenAI-compatible server (vLLM, SGLang, a hosted API) through
  the ``openai`` client's Completions endpoint; async, bounded concurrency, the
  client's retries with exponential backoff on rate limits, 5xx and time-outs.
  one request per sample with its seed (where the server takes ``seed``).
  Token ids come from vLLM's ``return_tokens_as_token_ids``; a server that does
  not give ids or log-probabilities yields samples with empty
  ``token_ids``/``logprobs=None``, which the policy update leaves out.
- ``vllm`` (tasks/models/vllm_backend.py): in-process ``vllm.LLM``, imported lazily; not part of the default
  install (vLLM pins its own torch and transformers).

Each also has ``score``: the log-probabilities of given completion tokens after given
prompts (a forward pass; for the served and vLLM backends, vLLM's ``prompt_logprobs`` over
prompt + completion), or ``ScoringUnavailable`` with the reason it cannot.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

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

    def generate(self, prompts: list[str], params: SamplingParams, seeds: list[list[int]] | None = None) -> list[list[Sample]]:
        """``n`` samples for each prompt, in prompt order; sample ``j`` of prompt ``i`` drawn with seed ``seeds[i][j]``
        (default: ``sampling.default_seeds(params.seed, prompts, n)``)."""

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
