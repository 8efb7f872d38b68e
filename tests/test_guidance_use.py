"""A run computes only what it uses (issue 43): which guidance outputs a config's training reads decides which guidance
stages run — plain GRPO runs no explain, hint, rubric or grade; ExPO no hint or grade — and the datasets the update
reads are the same rows as when every guidance stage ran."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.core.config import read_run_config
from tasks.core.store import Store
from tasks.registry import REGISTRY, STAGES, left_out, parse_config, round_stages, select_stages, upstream_of
from tests.conftest import chain_sum, tiny_config

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
#: the guidance beyond the three papers, which only its own presets read
NEWER = ("prefix", "self_hint")


def _config(method: str | None, *sets: str):
    raw, _ = read_run_config(QUICKSTART, method, list(sets))
    return parse_config(raw, base_dir=ROOT)


@pytest.mark.parametrize("method, online, without", [
    ("grpo", ["curate", "rollouts", "materialize", "grpo", "eval"], {"explain", "hint", "rubric", "grade", "filter", *NEWER}),
    ("expo", ["curate", "rollouts", "filter", "explain", "materialize", "grpo", "eval"], {"hint", "rubric", "grade", *NEWER}),
    ("lte", ["curate", "rollouts", "filter", "hint", "materialize", "grpo", "eval"], {"explain", "rubric", "grade", *NEWER}),
    ("exprl", ["curate", "rollouts", "rubric", "grade", "materialize", "grpo", "eval"], {"explain", "hint", "filter", *NEWER}),
    # the quickstart combines the three papers: it runs everything but the newer guidance (tests/test_prefix_self_hint.py)
    (None, [s for s in STAGES if s != "dpo" and s not in NEWER], set(NEWER)),
])
def test_a_method_runs_only_the_guidance_its_update_reads(method, online, without):
    config = _config(method)
    assert select_stages(round_stages(), config=config, only_used=True) == online
    why = left_out(round_stages(), config=config, only_used=True)
    assert set(why) == without
    if "grade" in why:
        assert "materialize.reward: verify" in why["grade"] and "read only by grade" in why["rubric"]
    if "explain" in why:
        assert "materialize.include_explanations is false" in why["explain"]
    if "filter" in why:
        assert why["filter"] == "read only by explain, hint, prefix, self_hint, left out"
    assert select_stages(online, config=config) == online  # resolving a resolved list changes nothing
    # `guidedrl run` trains dpo too: its pairs read explanations and hints where the method's dpo_pairs name them
    whole, m = set(select_stages(None, config=config)), config.materialize
    assert ("explain" in whole) == ("explain" in m.dpo_pairs or m.include_explanations)
    assert ("hint" in whole) == ("hint" in m.dpo_pairs or m.lte_replace)


def test_asking_for_a_stage_still_runs_it_and_a_settings_change_brings_guidance_back():
    config = _config("grpo")
    assert "explain" in select_stages(["explain", "grpo"], config=config)  # asked for by name: it runs
    assert select_stages(["grpo"], config=config) == ["curate", "rollouts", "materialize", "grpo"]
    back = _config("grpo", "materialize.reward=judge")
    assert {"rubric", "grade"} <= set(select_stages(["grpo"], config=back))
    assert "grade" in select_stages(round_stages(), config=_config("grpo", "judge.grade=always"), only_used=True)
    # without a config (the graph alone), materialize brings every guidance it may read
    assert select_stages(["materialize"]) == ["curate", "rollouts", "filter", "explain", "hint", "prefix", "rubric", "grade",
                                              "self_hint", "materialize"]


def test_the_update_reads_the_same_rows_without_the_guidance_it_does_not_use(tmp_path, random_checkpoint):
    """Plain GRPO (the grpo preset's materialize settings): materialize with only the stages it reads gives the grpo
    rows that it gives with every guidance stage run and read."""
    config = tiny_config(tmp_path, checkpoint=random_checkpoint, problems={"sources": [chain_sum(12, 4, "easy", digits=2)], "eval_fraction": 0.0},
                         rollouts={"samples_per_problem": 4, "max_new_tokens": 8, "shard_size": 8},
                         explain={"problems": "all", "samples_per_problem": 2}, hint={"samples_per_problem": 2},
                         materialize={"reward": "verify", "include_explanations": False, "lte_replace": False, "keep_uniform_groups": True})
    store = Store(tmp_path / "ws")
    everything, used = {}, {}
    for stage in select_stages(None):  # every stage the graph has (dpo and eval aside)
        if stage in ("dpo", "grpo", "eval"):
            continue
        everything[stage], _ = REGISTRY[stage].run(config, store, upstream_of(stage, everything))
    run = select_stages(round_stages(), config=config, only_used=True)
    assert {"explain", "hint", "grade"}.isdisjoint(run)
    for stage in run:
        if stage in ("grpo", "eval"):
            continue
        used[stage], _ = REGISTRY[stage].run(config, store, upstream_of(stage, used, config, run=run))
    assert used["materialize"].path != everything["materialize"].path  # made of other inputs: its own output
    assert used["materialize"].read("grpo").to_pylist() == everything["materialize"].read("grpo").to_pylist()
    assert used["materialize"].read("grpo").num_rows > 0
