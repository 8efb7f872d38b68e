"""ExpRL's process credit: each step's advantage from the judge's step scores, and each completion token's (its
step's), on the steps `grade` cut — the policy's tokens with ``judge.step_split: "###"`` (tasks/models/token_text.py),
else the steps' texts located in the completion. Used by `materialize` (through tasks/stages/_advantages.py) and by
the process rewards for other trainers (tasks/models/rewards.py)."""

from __future__ import annotations

from tasks.models.judge import DELIMITER, split_steps, steps_of_tokens
from tasks.models.token_text import token_spans, token_step_index


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
