"""guidedrl's rewards inside the trainers other teams run: the answer verifier and the ExpRL judges (rule or LLM, the
same client, cache, templates and settings as the `grade` stage) as TRL reward functions and verl's ``compute_score``.
A trainer imports this module; no pipeline runs.

    from tasks.models.rewards import trl_reward_functions
    verifier, judge = trl_reward_functions("configs/quickstart.yaml")      # or a dict of settings
    GRPOTrainer(model=..., reward_funcs=[verifier, judge], train_dataset=...)  # our TRL export: answer, reference_solution

    # verl (PPO/GRPO config):
    #   reward.custom_reward_function.path=<site-packages>/tasks/models/rewards.py
    #   reward.custom_reward_function.name=compute_score
    #   +reward.custom_reward_function.reward_kwargs.settings=/abs/path/config.yaml
    #   +reward.custom_reward_function.reward_kwargs.reward=judge   # or verifier

Settings: a guidedrl config file (its `judge`, `prompts`, `policy` and `workspace` sections are read; the rest is
ignored) or a dict of those sections (``{"judge": {...}}``). Secrets come from the environment as in `grade`
(``judge.api_key_env``); judge replies are cached under ``<workspace>/cache/judge``, shared with `grade`.

Process rewards (per step, placed on the policy's tokens as `materialize` places them): ``Rewards.token_credit``, and
for verl the reward manager in tasks/models/rewards_verl.py.

Failures are never rewards: a judge that is down, or whose reply cannot be parsed (after the reminder), gives TRL
``None`` (TRL leaves the sample out of that reward's sum) and makes verl's ``compute_score`` raise ``JudgeError``
(verl has no "no reward" value; a 0 would train).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from tasks.core.config import BaseConfig, read_yaml, validate
from tasks.models import answers, judge

#: the sections of a guidedrl config that the rewards read
SECTIONS = ("workspace", "policy", "prompts", "judge")


def load_settings(settings: str | Path | dict | None = None) -> BaseConfig:
    """The reward settings: a guidedrl config file (relative paths resolve against its folder) or a dict of its
    sections; only ``SECTIONS`` are read. None: the defaults (the rule judge)."""
    if settings is None or isinstance(settings, dict):
        raw, where, base = dict(settings or {}), "<reward settings>", Path.cwd()
    else:
        path = Path(settings).expanduser().resolve()
        raw, where, base = read_yaml(path), str(path), path.parent
    return validate(BaseConfig, {k: raw[k] for k in SECTIONS if k in raw}, where=where, base_dir=base)


class Rewards:
    """The verifier and the judge of one set of settings (``load_settings``)."""

    def __init__(self, settings: str | Path | dict | BaseConfig | None = None):
        self.config = settings if isinstance(settings, BaseConfig) else load_settings(settings)
        self._judge = None

    @property
    def judge(self):
        """The judge `grade` would make of these settings (built on first use)."""
        if self._judge is None:
            judge.check_judge(self.config)
            self._judge = judge.make_judge(self.config, self.config.workspace_dir())
        return self._judge

    def correct(self, completion: str, answer: str, metadata: Any = None) -> bool:
        """The answer verifier (math-verify; a reasoning-gym scorer where ``metadata`` names the task), as rollouts use it."""
        return answers.check(completion, {"answer": answer, "metadata": metadata})[1]

    def traces(self, questions: list[str], completions: list[str], answers_: list[str], references: list[str | None],
               metadata: list[Any] | None = None) -> list[judge.Trace]:
        meta = metadata or [None] * len(completions)
        return [judge.Trace(f"s{i}", f"p{i}", q, judge.reference_text({"reference_solution": r, "answer": a}), judge.judge_view(c),
                            self.correct(c, a, m))
                for i, (q, c, a, r, m) in enumerate(zip(questions, completions, answers_, references, meta))]

    def grade(self, questions, completions, answers_, references, metadata=None) -> list[dict]:
        """The judge's grade rows (as `grade` writes them) for these completions."""
        return self.judge.grade(self.traces(questions, completions, answers_, references, metadata))

    def token_credit(self, question: str, completion: str, token_ids: list[int], answer: str, reference: str | None,
                     tokenizer, metadata: Any = None) -> tuple[list[float] | None, dict]:
        """ExpRL's process credit of one completion: each of its tokens' advantage (its step's s_t − s_(t−1)), on the
        steps `grade` cuts — the policy's tokens with ``judge.step_split: "###"`` —, and the grade row; None where
        the judge gave no step scores. Needs ``judge.mode: process``."""
        from tasks.models.step_credit import token_advantages

        jc = self.config.judge
        if jc.mode != "process":
            raise judge.JudgeError("process rewards need judge.mode: process in the reward settings")
        [trace] = self.traces([question], [completion], [answer], [reference], [metadata])
        if jc.step_split == judge.DELIMITER:  # steps cut on the tokens, as grade.load_traces cuts them
            trace.steps = [judge.judge_view(t) for t in judge.completion_steps(tokenizer, completion, token_ids)[0]]
        [row] = self.judge.grade([trace])
        credit = token_advantages({"completion": completion, "completion_token_ids": token_ids}, row, tokenizer, jc.step_split)
        return credit, row


def _text(completion: Any) -> str:
    """A TRL completion as text: standard (a string) or conversational (the assistant's messages)."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if m.get("role", "assistant") == "assistant")


def _question(prompt: Any) -> str:
    """The question of a TRL prompt: the text, or the last user turn of the messages."""
    if isinstance(prompt, str):
        return prompt
    return next((m["content"] for m in reversed(prompt) if m.get("role") == "user"), "")


def trl_reward_functions(settings: str | Path | dict | BaseConfig | None = None) -> tuple[Callable, Callable]:
    """(verifier, judge) as TRL reward functions: ``f(prompts, completions, answer, reference_solution=None, **kw)``
    → one float per completion, or None where no reward exists (a judge failure). The verifier gives 1.0 for a right
    answer, 0.0 for a wrong one; the judge gives `grade`'s `outcome_score` (the ExpRL outcome reward, (s − 1)/4)."""
    rewards = Rewards(settings)

    def guidedrl_verifier(prompts, completions, answer, **kwargs) -> list[float]:
        meta = kwargs.get("metadata")
        return [1.0 if rewards.correct(_text(c), a, meta[i] if meta else None) else 0.0 for i, (c, a) in enumerate(zip(completions, answer))]

    def guidedrl_judge(prompts, completions, answer, reference_solution=None, **kwargs) -> list[float | None]:
        refs = reference_solution or [None] * len(completions)
        rows = rewards.grade([_question(p) for p in prompts], [_text(c) for c in completions], list(answer), list(refs), kwargs.get("metadata"))
        return [r["outcome_score"] if r["parse_ok"] else None for r in rows]

    return guidedrl_verifier, guidedrl_judge


def trl_async_reward_functions(settings: str | Path | dict | BaseConfig | None = None) -> tuple[Callable, Callable]:
    """``trl_reward_functions`` as coroutines (TRL runs async reward functions side by side with asyncio.gather): each
    grades in a worker thread, so the judge's requests of one function overlap the other's work."""
    import asyncio

    verifier, judge_fn = trl_reward_functions(settings)

    async def guidedrl_verifier(prompts, completions, answer, **kwargs):
        return await asyncio.to_thread(verifier, prompts, completions, answer, **kwargs)

    async def guidedrl_judge(prompts, completions, answer, reference_solution=None, **kwargs):
        return await asyncio.to_thread(judge_fn, prompts, completions, answer, reference_solution, **kwargs)

    return guidedrl_verifier, guidedrl_judge


@lru_cache(maxsize=8)
def _rewards_of(settings: str | None) -> Rewards:
    return Rewards(settings)


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None, *,
                  settings: str | None = None, reward: str = "verifier") -> dict:
    """verl's custom reward function (``reward.custom_reward_function``; ``settings`` and ``reward`` come from its
    ``reward_kwargs``): ``{"score": ..., "correct": ..., "analysis": ...}`` for one response. ``reward``: verifier (1.0
    right, 0.0 wrong) or judge (`grade`'s outcome score against ``extra_info.reference_solution`` of our verl export;
    the judge's raw reply in ``analysis``). A judge failure raises ``JudgeError``: never a 0 that trains."""
    if reward not in ("verifier", "judge"):
        raise ValueError(f"compute_score: reward must be 'verifier' or 'judge', not {reward!r}")
    rewards = _rewards_of(settings)
    info = extra_info or {}
    correct = rewards.correct(solution_str, ground_truth, info.get("metadata"))
    if reward == "verifier":
        return {"score": 1.0 if correct else 0.0, "correct": correct, "analysis": ""}
    question = info.get("question") or _question(list(info.get("prompt") or []))
    [row] = rewards.grade([question], [solution_str], [ground_truth], [info.get("reference_solution")], [info.get("metadata")])
    if not row["parse_ok"]:
        raise judge.JudgeError(f"compute_score ({data_source}, problem {info.get('problem_id')}): no judge reward — "
                               f"{row['error'] or 'unparseable judge answer'}")
    return {"score": float(row["outcome_score"]), "correct": correct, "analysis": row["judge_raw"] or ""}


__all__ = ["Rewards", "compute_score", "load_settings", "trl_async_reward_functions", "trl_reward_functions"]


if __name__ == "__main__":  # python -m tasks.models.rewards SETTINGS: the settings as the rewards read them
    import sys

    print(json.dumps(load_settings(sys.argv[1] if len(sys.argv) > 1 else None).model_dump(mode="json"), indent=2))
