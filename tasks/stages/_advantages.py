"""Advantage estimators, registered by name (``ADVANTAGES``, as verl's ``core_algos`` registers its estimators beside its
losses; the losses are in _grpo_losses.py): pure functions of rewards and step scores, used by `materialize`.

- ``grpo`` (DeepSeekMath, GRPO): (r − mean) / (std + 1e-6) in the group, population std;
- ``dr_grpo`` (Dr. GRPO, arXiv 2503.20783): r − mean (no std division);
- ExpRL's process rewards: step t gets s_t − s_(t−1), the first step s_1 − s_T (``step_advantages``), each completion
  token its step's (``token_advantages``) — pure functions of a grade and the policy's tokens, in
  tasks/models/step_credit.py so that the rewards for other trainers (tasks/models/rewards.py) place them the same way.
"""

from __future__ import annotations

import math
from typing import Callable

from tasks.models.step_credit import step_advantages, token_advantages  # noqa: F401  (the estimators' module names them too)

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
