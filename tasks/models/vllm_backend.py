"""The ``vllm`` generation backend: an in-process ``vllm.LLM`` (optional; vLLM pins its own torch, so it is
imported only here, lazily)."""

from __future__ import annotations

from pathlib import Path

from tasks.models.generation import BackendUnavailable, Sample, SamplingParams, checkpoint_fingerprint
from tasks.models.openai_backend import at_temperature_one
from tasks.models.sampling import default_seeds
from tasks.models.token_text import prompt_ids


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

    def generate(self, prompts: list[str], params: SamplingParams, seeds: list[list[int]] | None = None) -> list[list[Sample]]:
        """One engine request per sample (``n=1`` with the sample's seed: vLLM gives a seeded request its own
        generator, so a row does not depend on its batch-mates)."""
        seeds = seeds or default_seeds(params.seed, prompts, params.n)
        sps = [self._vllm.SamplingParams(
            n=1,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_new_tokens,
            seed=seed,
            logprobs=0,  # the sampled token's log-probability only
        ) for group in seeds for seed in group]
        outputs = self.llm.generate([p for p in prompts for _ in range(params.n)], sps)
        results: list[list[Sample]] = [[] for _ in prompts]
        for k, out in enumerate(outputs):
            c = out.outputs[0]
            ids = list(c.token_ids)
            lps = [float(step[t].logprob) for step, t in zip(c.logprobs, ids)] if c.logprobs else None
            results[k // params.n].append(Sample(c.text, ids, lps, c.finish_reason if c.finish_reason in ("stop", "length") else "stop"))
        return results

    def score(self, prompts: list[str], token_ids: list[list[int]], temperature: float = 1.0) -> list[list[float]]:
        """Completion tokens' log-probabilities from the engine's ``prompt_logprobs`` over prompt + completion
        token ids (temperature 1: vLLM's prompt log-probabilities are of the raw distribution)."""
        at_temperature_one(temperature, "vLLM's")
        tok = self.llm.get_tokenizer()
        encoded = [prompt_ids(tok, p) for p in prompts]
        todo = [(k, p, list(c)) for k, (p, c) in enumerate(zip(encoded, token_ids)) if c]
        sp = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outputs = self.llm.generate([{"prompt_token_ids": p + c} for _, p, c in todo], sp) if todo else []
        out: list[list[float]] = [[] for _ in prompts]
        for (k, p, c), o in zip(todo, outputs):
            out[k] = [float(entry[t].logprob) for entry, t in zip(o.prompt_logprobs[len(p):], c)]
        return out
