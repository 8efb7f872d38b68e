"""ExpRL's process rewards in verl: a reward manager (verl 0.9's reward loop) that grades each response step by step
with guidedrl's judge and places each step's token advantage on the step's tokens, cut on the policy's tokenizer as
`grade` cuts them (tasks/models/step_credit.py: the same function `materialize` uses). Loaded by verl from this file:

    reward:
      reward_manager: {source: importlib, name: ProcessRewardManager, module: {path: <site-packages>/tasks/models/rewards_verl.py}}
      custom_reward_function:
        reward_kwargs: {settings: /abs/path/config.yaml}   # its judge: section, with mode: process

The token-level tensor (`rm_scores`) holds the ExpRL advantages themselves (s_t − s_(t−1) on step t's tokens, s_1 − s_T
on the first step's): use it with an advantage estimator that takes token-level scores as they are. A response the
judge cannot grade raises ``JudgeError``: never a 0 that trains. Imports verl: only verl loads this module."""

from __future__ import annotations

import asyncio

import torch
from verl import DataProto
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase

from tasks.models import judge
from tasks.models.rewards import Rewards


def _settings_of(config) -> str | None:
    try:
        return config.reward.custom_reward_function.reward_kwargs.settings
    except Exception:  # (no reward_kwargs: the defaults, the rule judge)
        return None


class ProcessRewardManager(RewardManagerBase):
    """Per response: the judge's step scores → each token's advantage (``Rewards.token_credit``)."""

    def __init__(self, config, tokenizer, compute_score=None, reward_router_address=None, reward_model_tokenizer=None, **kwargs):
        super().__init__(config, tokenizer, compute_score)
        self.rewards = Rewards(_settings_of(config))

    async def run_single(self, data: DataProto) -> dict:
        item = data[-1:][0]
        response_ids = item.batch["responses"]
        length = int(item.batch["attention_mask"][-response_ids.shape[-1]:].sum())
        ids = [int(t) for t in response_ids[:length]]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        info = dict(item.non_tensor_batch.get("extra_info") or {})
        credit, row = await asyncio.get_running_loop().run_in_executor(None, lambda: self.rewards.token_credit(
            info.get("question") or "", text, ids, item.non_tensor_batch["reward_model"]["ground_truth"],
            info.get("reference_solution"), self.tokenizer, info.get("metadata")))
        if credit is None:
            raise judge.JudgeError(f"process reward for problem {info.get('problem_id')}: no step scores — "
                                   f"{row['error'] or 'the steps do not match the tokens'}")
        return {"reward_score": credit, "reward_extra_info": {"outcome": row["outcome_score"], "steps": len(row["steps"])}}

    @classmethod
    def assemble_rm_scores(cls, data: DataProto, scores: list[list[float]]) -> torch.Tensor:
        """Each response's token credit on its tokens (the rest of the row 0: padding)."""
        rm_scores = torch.zeros_like(data.batch["responses"], dtype=torch.float32)
        for i, credit in enumerate(scores):
            rm_scores[i, : len(credit)] = torch.tensor(credit, dtype=torch.float32)
        return rm_scores
