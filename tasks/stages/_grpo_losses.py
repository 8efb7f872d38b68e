"""The grpo update's loss pieces: pure functions over per-token tensors (B, T) with a completion
mask, and the step's normalisers (``Totals``) — kept apart from the data and the loop, as verl keeps
its losses in one module. tasks/stages/grpo.py's docstring says how they combine.

The training–inference mismatch corrections (``rollout_weights``) are here too: with π_old recomputed
by the trainer and the sampler's own log-probabilities known, each token's loss is weighted by
min(π_old / π_sampler, C) (``token-truncate``: truncated importance sampling) or the token is left out
of the loss and of its denominator when the ratio leaves [1/C, C] (``token-mask``), as verl, slime and
ms-swift do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from tasks.stages._grpo_data import KIND_EXPLAIN, KIND_GUIDED, KIND_PLAIN, n_tokens, row_kind

def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float) -> torch.Tensor:
    """Per-token PPO/GRPO clipped surrogate loss, −min(r·A, clip(r)·A)."""
    ratio = torch.exp(logp - old_logp)
    return -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)


def shaped_surrogate(logp: torch.Tensor, behaviour_logp: torch.Tensor, adv: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-token LTE/LUFFY policy-shaping loss, −f(r)·A with f(r) = r/(r+γ), unclipped."""
    ratio = torch.exp(logp - behaviour_logp)
    return -(ratio / (ratio + gamma)) * adv


def nll(logp: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token ExPO term: −β · log π_θ(token | original prompt)."""
    return -beta * logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π_θ ‖ π_ref) estimate, exp(ref − logp) − (ref − logp) − 1."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


#: loss aggregations by verl's `loss_agg_mode` name: (per-token loss (B, T), mask (B, T), scale) -> scalar
LOSS_AGG: dict[str, Callable[[torch.Tensor, torch.Tensor, int | None], torch.Tensor]] = {}


def register_loss_agg(name: str):
    def wrap(fn):
        LOSS_AGG[name] = fn
        return fn
    return wrap


def _live_sequences(mask: torch.Tensor) -> torch.Tensor:
    return (mask.sum(-1) > 0).float()


@dataclass(frozen=True)
class Totals:
    """The normalisers of one update step's loss, counted over the whole step's rows. A part of
    the step (a micro-batch, a rank's share) divided by these adds up, over the parts, to the
    loss of the whole step: gradient accumulation and data parallelism change nothing."""

    tokens: float  # completion tokens of the sample rows
    sequences: float  # sample rows with tokens
    explanations: float  # explanation rows with tokens
    width: int  # the longest completion: seq-mean-token-sum-norm's default L

    @classmethod
    def of_rows(cls, rows: list[dict], needs_behaviour: bool = True) -> "Totals":
        """The normalisers of ``rows``; tokens that `token-mask` left out (``masked_tokens``, counted per row when π_old
        was recomputed) are not counted."""
        lengths = [(row_kind(r, needs_behaviour), n_tokens(r["completion_token_ids"]) - int(r.get("masked_tokens") or 0))
                   for r in rows]
        samples = [n for k, n in lengths if k in (KIND_PLAIN, KIND_GUIDED) and n]
        return cls(float(sum(samples)), float(len(samples)), float(sum(1 for k, n in lengths if k == KIND_EXPLAIN and n)),
                   max(1, max((n for _, n in lengths), default=1)))

    @classmethod
    def of_mask(cls, samples: torch.Tensor, explanations: torch.Tensor) -> "Totals":
        return cls(float(samples.sum()), float(_live_sequences(samples).sum()), float(_live_sequences(explanations).sum()),
                   samples.shape[-1])


@register_loss_agg("token-mean")
def token_mean(per_token: torch.Tensor, mask: torch.Tensor, scale: int | None = None, totals: Totals | None = None) -> torch.Tensor:
    """Σ_i Σ_t ℓ_it / Σ_i |o_i|: every token of the batch weighs the same (verl's default, DAPO)."""
    tokens = totals.tokens if totals else float(mask.sum())
    return (per_token * mask).sum() / max(tokens, 1.0)


@register_loss_agg("seq-mean-token-mean")
def seq_mean_token_mean(per_token: torch.Tensor, mask: torch.Tensor, scale: int | None = None, totals: Totals | None = None,
                        sequences: float | None = None) -> torch.Tensor:
    """(1/N) Σ_i (1/|o_i|) Σ_t ℓ_it over the N sequences with tokens: the GRPO paper's (TRL's loss_type=grpo)."""
    live = _live_sequences(mask)
    per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    n = sequences if sequences is not None else totals.sequences if totals else float(live.sum())
    return (per_seq * live).sum() / max(n, 1.0)


@register_loss_agg("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(per_token: torch.Tensor, mask: torch.Tensor, scale: int | None = None, totals: Totals | None = None) -> torch.Tensor:
    """(1/N) Σ_i (1/L) Σ_t ℓ_it with a constant L (Dr. GRPO; default: the batch's padded completion width, as verl)."""
    live = _live_sequences(mask)
    per_seq = (per_token * mask).sum(-1) / float(scale or (totals.width if totals else mask.shape[-1]))
    n = totals.sequences if totals else float(live.sum())
    return (per_seq * live).sum() / max(n, 1.0)


def expo_term(logp: torch.Tensor, mask: torch.Tensor, beta: float, totals: Totals | None = None, form: str = "token-mean"
              ) -> torch.Tensor:
    """ExPO's term over the explanation rows (``mask``: their tokens), averaged over the step's explanation rows:
    ``sequence`` — β · (−log π_θ(c̃, a* | q)), each explanation's NLL summed over its tokens (the paper's form);
    ``token-mean`` — β · each explanation's per-token mean NLL (the paper's β divided by the explanation's length)."""
    explanations = totals.explanations if totals else None
    if form == "sequence":
        live = _live_sequences(mask)
        n = explanations if explanations is not None else float(live.sum())
        return (nll(logp, beta) * mask).sum() / max(n, 1.0)
    return seq_mean_token_mean(nll(logp, beta), mask, sequences=explanations)


def expo_beta_at(cfg, step: int, steps: int) -> float:
    """ExPO's β on update step ``step`` of ``steps``: constant, or decaying linearly to 0."""
    if cfg.expo_beta_schedule == "linear" and steps > 1:
        return cfg.expo_beta * (1.0 - step / (steps - 1))
    return cfg.expo_beta



def rollout_weights(old_logp: torch.Tensor, sampler_logp: torch.Tensor, known: torch.Tensor, mode: str, threshold: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token weight, per-token keep mask) of the training–inference mismatch correction, both (B, T) and without
    gradient: ``known`` (B, T) marks the tokens whose sampler log-prob is known (elsewhere weight 1, kept).
    ``token-truncate``: w = min(π_old / π_sampler, C); ``token-mask``: keep only tokens with 1/C <= ratio <= C; ``none``: 1."""
    ones = torch.ones_like(old_logp)
    if mode == "none":
        return ones, ones
    ratio = torch.exp((old_logp - sampler_logp).detach())
    if mode == "token-truncate":
        return torch.where(known > 0, torch.clamp(ratio, max=threshold), ones), ones
    if mode == "token-mask":
        inside = ((ratio >= 1.0 / threshold) & (ratio <= threshold)).float()
        return ones, torch.where(known > 0, inside, ones)
    raise ValueError(f"unknown rollout_correction {mode!r}; allowed: none, token-truncate, token-mask")


def mismatch(old_logp: torch.Tensor, sampler_logp: torch.Tensor, known: torch.Tensor, threshold: float, mode: str) -> dict:
    """The sampler–trainer mismatch over the tokens whose sampler log-prob is known: count, sum and max of
    |Δ log p|, and how many the cap touched (truncated: ratio > C; masked: ratio outside [1/C, C])."""
    k = known > 0
    if not bool(k.any()):
        return {"tokens": 0, "abs_sum": 0.0, "abs_max": 0.0, "capped": 0}
    delta = (old_logp - sampler_logp).detach()[k]
    ratio = torch.exp(delta)
    capped = (ratio > threshold) if mode != "token-mask" else ((ratio > threshold) | (ratio < 1.0 / threshold))
    return {"tokens": int(k.sum()), "abs_sum": float(delta.abs().sum()), "abs_max": float(delta.abs().max()), "capped": int(capped.sum())}
