import pytest

from tasks.core.config import ConfigError, apply_overrides, masked
from tasks.registry import load_config, parse_config

BASE = {"problems": {"sources": [{"reasoning_gym": {"task": "chain_sum", "size": 5}}]}}


def test_defaults_are_filled_in():
    cfg = parse_config(BASE)
    assert cfg.workspace == "./workspace"
    assert cfg.problems.eval_fraction == 0.2 and cfg.problems.decontamination.ngram == 8
    assert cfg.prefect.retries_for("curate") == 1


def test_unknown_key_names_the_key_and_the_allowed_ones():
    with pytest.raises(ConfigError) as e:
        parse_config({**BASE, "problems": {**BASE["problems"], "eval_frac": 0.3}}, where="my.yaml")
    msg = str(e.value)
    assert "my.yaml" in msg and "problems.eval_frac: unknown key" in msg
    assert "sources" in msg and "eval_fraction" in msg and "decontamination" in msg


def test_bad_values_name_the_key_and_allowed_values():
    raw = {"problems": {"sources": [{"file": "x.csv", "split": "test"}]}}
    with pytest.raises(ConfigError, match=r"problems\.sources\.0\.split: Input should be 'train' or 'eval'"):
        parse_config(raw)
    with pytest.raises(ConfigError, match=r"problems\.sources\.0.*exactly one of 'file', 'hf', 'reasoning_gym' \(got file, reasoning_gym\)"):
        parse_config({"problems": {"sources": [{"file": "x", "reasoning_gym": {"task": "t", "size": 1}}]}})
    with pytest.raises(ConfigError, match=r"problems: required key is missing"):
        parse_config({})
    with pytest.raises(ConfigError, match=r"stage_retries: unknown stage\(s\) \['curation'\]"):
        parse_config({**BASE, "prefect": {"stage_retries": {"curation": 2}}})


def test_set_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("problems:\n  sources:\n    - reasoning_gym: {task: chain_sum, size: 5}\n")
    cfg = load_config(path, ["problems.eval_fraction=0.5", "problems.sources.0.reasoning_gym.size=9", "prefect.stage_retries.curate=3"])
    assert cfg.problems.eval_fraction == 0.5 and cfg.problems.sources[0].reasoning_gym.size == 9
    assert cfg.prefect.retries_for("curate") == 3
    with pytest.raises(ConfigError, match="is a list of 1; '4' is not an index"):
        apply_overrides({"a": [1]}, ["a.4=2"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["novalue"])


def test_literal_secrets_are_refused_and_references_masked(monkeypatch):
    with pytest.raises(ConfigError, match=r"judge\.api_key: looks like a secret.*api_key_env"):
        parse_config({**BASE, "judge": {"api_key": "sk-123"}})
    with pytest.raises(ConfigError, match=r"x\.hf_token: looks like a secret"):
        parse_config({**BASE, "x": {"hf_token": "hf_abc"}})
    parse_config({**BASE, "rollouts": {"max_new_tokens": 5}, "policy": {"tokenizer": "some/dir"}})  # not secrets
    with pytest.raises(ConfigError, match="a URL with a password"):
        parse_config({**BASE, "x": "https://bob:hunter2@example.org/v1"})
    monkeypatch.setenv("MY_KEY", "sk-very-secret")
    shown = masked({"judge": {"api_key_env": "MY_KEY", "other_env": "UNSET_VAR_X"}, "u": "https://bob:pw@h/x"})
    assert shown == {"judge": {"api_key_env": "MY_KEY (set)", "other_env": "UNSET_VAR_X (not set)"}, "u": "https://bob:****@h/x"}
    assert "sk-very-secret" not in str(shown)


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("problems: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+, column \d+: not valid YAML"):
        load_config(bad)


def test_method_presets_set_the_papers_values_and_set_still_wins(tmp_path):
    import yaml

    from tasks.core.config import presets, read_run_config

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "rollouts": {"samples_per_problem": 4, "max_new_tokens": 99}}))
    assert presets() == ["expo", "exprl", "exprl-outcome", "grpo", "lte", "prefix", "self-hint"]
    raw, preset = read_run_config(path, "exprl", ["train.grpo.kl=0.01"])
    cfg = parse_config(raw)
    # the ExpRL authors' process script (../shared/methods/what-the-authors-do.md)
    assert cfg.rollouts.samples_per_problem == 16 and cfg.rollouts.temperature == 0.8
    assert cfg.rollouts.max_new_tokens == 16384 and cfg.rollouts.max_prompt_tokens == 4096
    assert cfg.judge.mode == "process" and cfg.judge.process_protocol == "segment" and cfg.judge.step_split == "###"
    assert cfg.judge.temperature == 0.0 and cfg.judge.max_tokens == 2048 and cfg.prompts.judge_outcome == "judge_outcome_exact"
    g = cfg.train.grpo
    assert cfg.materialize.reward == "judge" and g.learning_rate == 1e-6 and g.kl_reference == "initial"
    assert (g.clip_low, g.clip_high, g.entropy, g.loss_agg, g.epochs) == (0.2, 0.26, 0.0, "token-mean", 1)
    assert g.kl == 0.01 and preset["train.grpo.kl"][0] == 0.001 and "low_var_kl" in preset["train.grpo.kl"][1]
    assert "k3" in preset["train.grpo.kl"][1]
    raw, preset = read_run_config(path, "exprl-outcome")
    cfg = parse_config(raw)
    assert cfg.rollouts.samples_per_problem == 10 and cfg.judge.mode == "outcome" and cfg.train.grpo.clip_high == 0.28
    assert cfg.materialize.advantage == "grpo" and cfg.prompts.judge_outcome == "judge_outcome_exact" and cfg.train.grpo.kl == 0.001
    for method in presets():  # every preset is a valid config over any config, and names a source for what it sets
        raw, preset = read_run_config(path, method)
        parse_config(raw)
        assert preset and all(src for _, src in preset.values())
    with pytest.raises(ConfigError, match="no preset .*presets: expo, exprl, exprl-outcome, grpo, lte"):
        read_run_config(path, "ppo")
