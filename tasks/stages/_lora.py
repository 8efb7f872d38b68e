"""LoRA as both training stages (dpo, grpo) take it: the settings and the peft config made of them."""

from __future__ import annotations

from pydantic import Field

from tasks.core.config import StrictModel


class LoraSettings(StrictModel):
    """The LoRA fields of a training stage's section (a stage may say more of `lora` in its own description)."""

    lora: bool = Field(False, description="train LoRA adapters (peft) on every linear layer and merge them into the saved checkpoint")
    lora_r: int = Field(16, gt=0, description="the adapters' rank")
    lora_alpha: int = Field(32, gt=0, description="the adapters' scaling numerator (scale alpha / r)")


def lora_config(cfg: LoraSettings):
    """peft's LoraConfig of these settings: every linear layer, no dropout, a causal LM."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
