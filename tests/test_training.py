"""Offline DPO (TRL's DPOTrainer on materialised files) and the eval stage."""

from pathlib import Path

import polars as pl
import pytest
from transformers import AutoModelForCausalLM

from tasks.core.schemas import to_table
from tasks.core.store import Store
from tasks.models.answers import chain_sum_reference
from tasks.models.prompts import chat, fill, load_template
from tasks.models.tiny_policy import solution_text
from tasks.registry import parse_config
from tasks.stages import curate, dpo
from tasks.stages import eval as evaluate
from tasks.stages.dpo import DPOTrainConfig
from tests.conftest import chain_sum

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "data" / "models" / "tiny-policy"


def _dpo_dir(tmp_path, n=48):
    """A materialised dpo dataset of reasoning-gym chain sums: the worked
    solution chosen, a systematically wrong one (every result 0) rejected — a
    preference that can carry over to held-out problems."""
    import reasoning_gym
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TINY))
    template = load_template("tiny_plain")
    data = reasoning_gym.create_dataset("chain_sum", size=n, seed=5, min_terms=2, max_terms=2, min_digits=1, max_digits=2)
    rows = []
    for i, entry in enumerate(data):
        expr = entry["metadata"]["expression"]
        right = solution_text(expr)
        wrong = "\n".join(line.rsplit("=", 1)[0] + "= 0" for line in chain_sum_reference(expr).splitlines()[:-1]) + "\n\\boxed{0}"
        rows.append({"prompt": chat(tok, fill(template, entry["question"])), "chosen": right, "rejected": wrong,
                     "problem_id": f"p{i}", "chosen_kind": "plain", "rejected_kind": "plain"})
    store = Store(tmp_path / "ws")
    out = store.write("materialize", "k", {"dpo": ("dpo", to_table(rows, "dpo"))}, config={}, inputs={}, stage_version="t")
    return out.dataset_path("dpo")


@pytest.mark.parametrize("lora", [False, True])
def test_dpo_on_materialised_files_lowers_the_heldout_loss_and_raises_the_log_ratio(tmp_path, lora):
    cfg = DPOTrainConfig(learning_rate=2e-3 if lora else 5e-4, max_steps=12, batch_size=8, max_length=128,
                         heldout_fraction=0.25, lora=lora, lora_r=8, lora_alpha=16)
    metrics = dpo.train(TINY, _dpo_dir(tmp_path), tmp_path / "ckpt", cfg)
    before, after = metrics["heldout_before"], metrics["heldout_after"]
    assert before["pairs"] >= 4 and metrics["train_pairs"] + before["pairs"] == 48
    assert before["log_ratio_margin"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as the reference
    assert after["loss"] < before["loss"] - 0.05
    assert after["log_ratio_margin"] > before["log_ratio_margin"] + 0.5
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt"))  # a plain checkpoint, adapters merged
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_dpo_refuses_a_dataset_without_pairs(tmp_path):
    store = Store(tmp_path / "ws")
    out = store.write("materialize", "k", {"dpo": ("dpo", to_table([], "dpo"))}, config={}, inputs={}, stage_version="t")
    with pytest.raises(ValueError, match="no training pairs"):
        dpo.train(TINY, out.dataset_path("dpo"), tmp_path / "ckpt", DPOTrainConfig(max_steps=1))


def test_eval_stage_writes_pass_rates_by_level_and_a_chart(tmp_path):
    levels = {"easy": {"min_digits": 1, "max_digits": 1}, "hard": {"min_digits": 2, "max_digits": 2}}
    config = parse_config({
        "problems": {"sources": [chain_sum(12, 3 + i, lvl, **c)
                                 for i, (lvl, c) in enumerate(levels.items())],
                     "eval_fraction": 0.5},
        "policy": {"model": str(TINY), "batch_size": 64},
        "prompts": {"plain": "tiny_plain"},
        "rollouts": {"max_new_tokens": 40},
        "eval": {"samples_per_problem": 4},
    }, base_dir=tmp_path)
    store = Store(tmp_path / "ws")
    cur, _ = curate.STAGE.run(config, store)
    out, _ = evaluate.STAGE.run(config, store, {"curate": cur})
    df = pl.read_parquet(out.path / "eval" / "data" / "*.parquet")
    by_level = {r["level"]: r for r in df.to_dicts()}
    assert set(by_level) == {"all", "easy", "hard"} and set(df["policy"]) == {"base"} and set(df["k"]) == {4}
    assert by_level["easy"]["pass_at_1"] > 0.8 and by_level["hard"]["pass_at_1"] < 0.3  # what the tiny policy is
    assert all(r["pass_at_1"] <= r["pass_at_k"] for r in df.to_dicts())
    png = out.path / "charts" / "eval.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.manifest["directories"]["charts"]["fingerprint"].startswith("sha256:")
