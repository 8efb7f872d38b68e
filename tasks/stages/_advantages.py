"""Advantage estimators, registered by name (``ADVANTAGES``, as verl's ``core_algos`` registers its estimators beside its
losses; the losses are in _grpo_losses.py): pure functions of rewards and step scores, used by `materialize`.

- ``grpo`` (DeepSeekMath, GRPO): (r − mean) / (std + 1e-6) in the group, population std;
- ``dr_grpo`` (Dr. GRPO, arXiv 2503.20783): r − mean (no std division);
- ExpRL's process rewards: step t gets s_t − s_(t−1), the first step s_1 − s_T (``step_advantages``), each completion
  token its step's (``token_advantages``).
"""

from __future__ import annotations

import math
from typing import Callable

from tasks.models.judge import DELIMITER, split_steps, steps_of_tokens
from tasks.models.token_text import token_spans, token_step_index

#: group advantage estimators by `materialize.advantage` name: rewards (None: masked, no part in the mean) -> advantages
ADVANTAGES: dict[str, Callable[[list[float | None]], list[float | None]]] = {}


def register_advantage(name: str):
    def wrap(fn):
        ADVANTAGES[name] = fn
        return fn
    return wrap


def _centred(rewards: list[float | None], divide_by_std: bool) -> list[float | None]:
    known = [r for r in rewards if r is not None]
    if not known:
        return [None] * len(rewards)
    mean = math.fsum(known) / len(known)
    std = math.sqrt(math.fsum((r - mean) ** 2 for r in known) / len(known)) if len(known) > 1 else 0.0  # population std
    div = (std + 1e-6) if divide_by_std else 1.0
    return [None if r is None else (r - mean) / div for r in rewards]


@register_advantage("grpo")
def grpo_advantages(rewards: list[float | None]) -> list[float | None]:
    """(r − mean) / (std + 1e-6) over the group's known rewards."""
    return _centred(rewards, True)


@register_advantage("dr_grpo")
def dr_grpo_advantages(rewards: list[float | None]) -> list[float | None]:
    """r − mean over the group's known rewards."""
    return _centred(rewards, False)


def group_advantages(rewards: list[float | None], scale: str = "grpo") -> list[float | None]:
    """Group-normalised advantages by the estimator named ``scale``; rows without a reward (masked) get none and
    take no part in the mean."""
    return ADVANTAGES[scale](rewards)


def step_advantages(step_scores: list[float]) -> list[float]:
    """ExpRL process mode: step t gets s_t − s_(t−1); the first step s_1 − s_T. A single-step trace
    gets s_1 (the authors' code sets step 1 to s_1; s_1 − s_T would be 0 there)."""
    if not step_scores:
        return []
    if len(step_scores) == 1:
        return [step_scores[0]]
    return [step_scores[0] - step_scores[-1]] + [b - a for a, b in zip(step_scores, step_scores[1:])]


def token_advantages(row: dict, grade: dict, tokenizer, step_split: str) -> list[float] | None:
    """Each completion token's advantage: its step's (``step_advantages``). With ``step_split: "###"`` the
    steps are token spans cut as the grade stage cut them (tasks/models/token_text.py: token_steps), and each
    span takes its step's advantage exactly; else the steps' texts are located in the completion."""
    if tokenizer is None or not grade or not grade.get("parse_ok") or not grade.get("step_scores"):
        return None
    adv = step_advantages(grade["step_scores"])
    if step_split == DELIMITER:
        if row.get("completion_token_ids") is None:
            return None
        spans = steps_of_tokens(tokenizer, list(row["completion_token_ids"]))[1]
        if len(spans) != len(adv):
            return None
        return [a for (start, end), a in zip(spans, adv) for _ in range(end - start)]
    steps = grade["steps"] or split_steps(row["completion"], step_split)
    if len(adv) != len(steps):
        return None
    text, spans = token_spans(tokenizer, row["completion_token_ids"])
    return [adv[i] for i in token_step_index(text, spans, steps)]
