"""Per-sample seeds and the in-process sampler: every sampled row is drawn from its own
random stream, so a row depends on its problem, its index and the seed — never on how
the work was cut (shard size, workers, fan-out) or on which rows shared its batch.

- ``sample_seed(seed, problem_id, sample_idx, prompt_kind)``: the seed of one sample,
  a hash of the stage's seed, the problem, the sample's index and the prompt kind
  (``plain`` for rollouts and eval, ``explain``/``hint`` for guided samples), in
  [0, 2**31) so that any server's ``seed`` field takes it.
- ``decode(...)``: batched autoregressive sampling with a KV cache in which row ``b``
  draws token ``t`` by inverting the CDF of its (temperature-, top-p-processed)
  distribution at ``uniforms[b, t]`` — uniforms from a ``torch.Generator`` seeded
  with the row's seed. With the attention mask and position ids of left padding, a
  row's logits do not depend on its batch-mates except through floating-point
  rounding (different padded widths, different matrix shapes), so a token can flip
  only when a uniform falls within that rounding of a CDF boundary.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

SEED_RANGE = 1 << 31


def sample_seed(seed: int, problem_id: str, sample_idx: int, prompt_kind: str = "plain") -> int:
    """The seed of sample ``sample_idx`` of ``problem_id`` under a stage seeded ``seed``."""
    digest = hashlib.sha256(f"{seed}|{prompt_kind}|{problem_id}|{sample_idx}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_RANGE


def sample_seeds(seed: int, problem_id: str, n: int, prompt_kind: str = "plain") -> list[int]:
    """The seeds of samples 0..n-1 of one problem."""
    return [sample_seed(seed, problem_id, j, prompt_kind) for j in range(n)]


def default_seeds(seed: int, prompts: Sequence[str], n: int) -> list[list[int]]:
    """Seeds for callers that name no problems (benchmarks, tests): problem ``i`` is the i-th prompt."""
    return [sample_seeds(seed, str(i), n) for i in range(len(prompts))]


def uniforms(seeds: Sequence[int], steps: int, device="cpu"):
    """(rows, steps) uniforms in [0, 1), row ``b`` from a generator seeded ``seeds[b]`` (float64)."""
    import torch

    out = torch.empty(len(seeds), steps, dtype=torch.float64)
    for b, s in enumerate(seeds):
        out[b] = torch.rand(steps, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
    return out.to(device)


def processed_logprobs(logits, temperature: float, top_p: float):
    """log-probabilities of the distribution sampled from: ``log_softmax(logits / T)`` restricted to the
    nucleus (the smallest set of most likely tokens whose probability reaches ``top_p``; at least one),
    renormalised. Temperature 0: the raw ``log_softmax`` (greedy picks its argmax)."""
    import torch

    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    if temperature > 0 and top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(ordered, dim=-1)
        before = probs.cumsum(-1) - probs  # the mass of the tokens more likely than each
        drop = before >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def draw(logp, u, temperature: float):
    """One token per row: the inverse CDF (token-id order) of ``exp(logp)`` at ``u`` (greedy: the argmax)."""
    import torch

    if temperature <= 0:
        return logp.argmax(-1)
    cdf = logp.double().exp().cumsum(-1)
    picked = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
    picked = picked.clamp(max=logp.shape[-1] - 1)
    return torch.where(torch.isinf(logp.gather(-1, picked[:, None]).squeeze(-1)), logp.argmax(-1), picked)


def decode(model, ids, mask, seeds: Sequence[int], temperature: float, top_p: float, max_new_tokens: int, stops: Sequence[int], pad: int):
    """Sample up to ``max_new_tokens`` after left-padded ``ids`` (``mask``: 1 on real tokens), row ``b``
    from its own stream ``seeds[b]``: (tokens (B, T), log-probs (B, T)); rows that ended (a token of ``stops``,
    the stop ids) are padded with ``pad`` and log-prob 0. Stops when every row has ended."""
    import torch

    rows = ids.shape[0]
    u = uniforms(seeds, max_new_tokens, ids.device)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    done = torch.zeros(rows, dtype=torch.bool, device=ids.device)
    stop_ids = torch.tensor(list(stops), dtype=torch.long, device=ids.device)
    tokens, logps, cache = [], [], None
    step_ids, step_pos = ids, pos
    with torch.no_grad():
        for t in range(max_new_tokens):
            out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
            cache = out.past_key_values
            logp = processed_logprobs(out.logits[:, -1, :], temperature, top_p)
            tok = draw(logp, u[:, t], temperature)
            lp = logp.gather(-1, tok[:, None]).squeeze(-1)
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            tokens.append(tok)
            logps.append(torch.where(done, torch.zeros_like(lp), lp))
            done = done | torch.isin(tok, stop_ids)
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones(rows, 1, dtype=mask.dtype, device=mask.device)], dim=-1)
            step_ids, step_pos = tok[:, None], step_pos[:, -1:] + 1
    return torch.stack(tokens, dim=1), torch.stack(logps, dim=1)
