"""Reference-prefix and self-written-hint guidance (issue 43): the stages `prefix` and `self_hint`, their rows in the
grpo dataset (a group of their own under the prompt they were shown, or LTE's replacement under the plain prompt),
the frontier's counts, the verl export's guidance column and the presets."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
import torch

import tasks.stages.rollouts as rollouts_mod
from tasks.core.config import ConfigError, read_run_config
from tasks.core.store import Store
from tasks.models.answers import mentions_answer
from tasks.models.transformers_backend import TransformersBackend
from tasks.registry import left_out, parse_config, round_stages, select_stages
from tasks.stages import curate, prefix, self_hint
from tasks.stages import filter as filter_stage
from tasks.stages.materialize import build
from tasks.stages.prefix import prefix_steps
from tasks.stages.self_hint import usable_hint
from tests.conftest import chain_sum, tiny_config
from tests.test_materialize import PLAIN, _row

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = "1 - 9 = -8\n-8 - 2 = -10\n-10 - 6 = -16\n-16 - 7 = -23\n-23 - 4 = -27\nThe answer is -27."


def test_the_prefix_is_the_first_steps_by_the_rounds_fraction_and_never_states_the_answer():
    # 6 steps (non-blank lines): 0.5 -> 3, 0.25 -> 1, 1.0 -> at most 5 (never all), 0.01 -> at least 1
    assert prefix_steps(REFERENCE, "-27", 0.5) == "1 - 9 = -8\n-8 - 2 = -10\n-10 - 6 = -16\n"
    assert prefix_steps(REFERENCE, "-27", 0.25) == "1 - 9 = -8\n"
    assert prefix_steps(REFERENCE, "-27", 0.01) == "1 - 9 = -8\n"
    assert prefix_steps(REFERENCE, "-27", 1.0) == "1 - 9 = -8\n-8 - 2 = -10\n-10 - 6 = -16\n-16 - 7 = -23\n"
    # cut before the first step that states the answer: here the second partial sum is already -10
    assert prefix_steps("2 - 5 = -3\n-3 - 7 = -10\n-10 + 0 = -10\nThe answer is -10.", "-10", 0.75) == "2 - 5 = -3\n"
    assert prefix_steps("4 + 3 = 7\nThe answer is 7.", "7", 0.5) is None  # the only step states the answer
    assert prefix_steps("The answer is 7.", "7", 0.5) is None and prefix_steps(None, "7", 0.5) is None
    cfg = tiny_config(prefix={"fractions": [0.5, 0.25]})
    assert [cfg.prefix.model_copy(update={"round": r}).fraction() for r in (1, 2, 3)] == [0.5, 0.25, 0.25]
    with pytest.raises(ConfigError, match=r"prefix\.fractions\.1: Input should be less than or equal to 1"):
        tiny_config(prefix={"fractions": [0.5, 1.5]})


def test_the_leak_check_finds_the_answer_as_a_whole_token():
    assert mentions_answer("so it is 27.", "27") and mentions_answer("-23 - 4 = -27", "-27") and mentions_answer("x = -27", "27")
    assert not mentions_answer("127 and 270", "27") and not mentions_answer("2.75", "2") and not mentions_answer("anything", " ")
    assert usable_hint("4 + 4 = 8\n\n8 + 2 = 10\n\\boxed{10}", "10", 1) == "4 + 4 = 8"
    assert usable_hint("4 + 4 = 8\n8 + 2 = 10\n\\boxed{10}", "10", 2) is None  # the second line states the answer
    assert usable_hint("Add the terms from left to right.", "10", None) == "Add the terms from left to right."
    assert usable_hint(" \n ", "10", None) is None


PREFIXED = "<|user|>What is {q}?<|end|><|assistant|>3 + 4 = 7\n"


def _prefixed(pid, idx, correct, loss):
    r = _row(pid, idx, f"step {idx}\n\\boxed{{{7 if correct else idx}}}", correct, kind="plain")
    prompt = PREFIXED.format(q=pid)
    return {**r, "sample_id": f"{pid}-prefix-{idx}", "prompt_kind": "prefix", "prompt": prompt, "guidance": "3 + 4 = 7\n",
            "loss_prompt": prompt if loss == "guided" else PLAIN.format(q=pid),
            "loss_logprobs": None if loss == "guided" else [-2.5] * len(r["completion"])}


def _groups(rows):
    groups = defaultdict(list)
    for r in rows:
        groups[r["group_id"]].append(r)
    return groups


def test_guided_prefix_samples_are_a_group_of_their_own_under_the_prompt_they_were_shown(tmp_path):
    rollouts = [_row("B", i, f"wrong {i}\n\\boxed{{{i}}}", False) for i in range(4)] + [_row("A", i, "\\boxed{7}", i < 2) for i in range(4)]
    samples = {"prefixed": [_prefixed("B", i, i == 0, "guided") for i in range(4)] + [_prefixed("A", i, False, "guided") for i in range(4)]}
    config = tiny_config(tmp_path, materialize={"include_prefixed": True, "include_explanations": False, "lte_replace": False})
    out, counts = build(config, rollouts, [], [], {}, samples=samples)
    groups = _groups(out["grpo"])
    # B's plain group is uniform (all wrong): dropped; A's prefix group too (all wrong); B's prefix group: 1 right of 4
    assert set(groups) == {"g-A", "g-B-prefix"} and counts["prefix_groups"] == 2 and counts["prefix_uniform_groups"] == 1
    b = sorted(groups["g-B-prefix"], key=lambda r: r["sample_id"])
    assert [r["reward"] for r in b] == [1.0, 0.0, 0.0, 0.0]
    # hand-computed: mean 0.25, std sqrt(0.1875) = 0.4330 -> (1 - 0.25) / 0.4330 = 1.7321, (0 - 0.25) / 0.4330 = -0.5774
    assert [r["advantage"] for r in b] == pytest.approx([1.7321, -0.5774, -0.5774, -0.5774], abs=1e-3)  # (std + ε)
    for r in b:  # on-policy under the prompt that holds the prefix: not guided, the sampler's log-probs on the loss side
        assert not r["is_guided"] and r["loss_prompt"] == PREFIXED.format(q="B") and r["loss_logprobs"] == r["behaviour_logprobs"]
    assert not any(r["prompt_kind"] == "prefix" for r in out["dpo"] + out["sft"])  # no pairs, no sft rows
    # not included: the rows are those of plain GRPO
    plain, _ = build(tiny_config(tmp_path, materialize={"include_explanations": False, "lte_replace": False}), rollouts, [], [], {},
                     samples=samples)
    assert set(_groups(plain["grpo"])) == {"g-A"}


def test_plain_loss_prefix_samples_replace_failed_rollouts_as_lte_hints_do(tmp_path):
    rollouts = [_row("B", i, f"wrong {i}\n\\boxed{{{i}}}", False) for i in range(4)]
    samples = {"prefixed": [_prefixed("B", i, i < 2, "plain") for i in range(4)]}
    config = tiny_config(tmp_path, materialize={"include_prefixed": True, "include_explanations": False, "lte_replace": False},
                         prefix={"loss": "plain"})
    out, counts = build(config, rollouts, [], [], {}, samples=samples)
    b = out["grpo"]
    guided = [r for r in b if r["prompt_kind"] == "prefix"]
    assert {r["group_id"] for r in b} == {"g-B"} and len(guided) == 2 and counts["prefix_replaced_samples"] == 2
    assert all(r["is_guided"] and r["reward"] == 1.0 and r["loss_prompt"] == PLAIN.format(q="B") for r in guided)
    assert all(r["loss_logprobs"][0] == -2.5 and r["behaviour_logprobs"][0] == -0.5 for r in guided)
    assert counts.get("lte_replaced_samples", 0) == 0


def _run(config, ws, monkeypatch, stage, right=True):
    """curate, rollouts (every plain sample wrong), filter, then ``stage`` whose samples are right when ``right``: the
    random policy never answers right, so the checker is replaced — what is tested is the plumbing."""
    real = rollouts_mod.check
    store = Store(ws)
    cur, _ = curate.STAGE.run(config, store)
    monkeypatch.setattr(rollouts_mod, "check", lambda t, p: (real(t, p)[0] or "0", False))
    ro, _ = rollouts_mod.STAGE.run(config, store, {"curate": cur})
    fil, _ = filter_stage.STAGE.run(config, store, {"curate": cur, "rollouts": ro})
    monkeypatch.setattr(rollouts_mod, "check", lambda t, p: (real(t, p)[0] or "0", right))
    out, _ = stage.STAGE.run(config, store, {"curate": cur, "rollouts": ro, "filter": fil})
    return cur, ro, out


def _config(checkpoint, tmp_path, **extra):
    return tiny_config(tmp_path, checkpoint=checkpoint, problems={"sources": [chain_sum(8, 4, "hard", terms=4, digits=2)], "eval_fraction": 0.0},
                       rollouts={"samples_per_problem": 3, "max_new_tokens": 6, "shard_size": 8}, **extra)


@pytest.mark.parametrize("form, loss", [("response", "guided"), ("prompt", "plain")])
def test_the_prefix_stage_shows_the_reference_steps_and_scores_where_the_loss_says(tmp_path, random_checkpoint, monkeypatch, form, loss):
    config = _config(random_checkpoint, tmp_path, prefix={"form": form, "loss": loss, "fractions": [0.5]})
    cur, ro, out = _run(config, tmp_path / "ws", monkeypatch, prefix)
    problems = {p["problem_id"]: p for p in cur.read("problems").to_pylist()}
    plain = {r["problem_id"]: r["prompt"] for r in ro.read("rollouts").to_pylist()}
    rows = out.read("prefixed").to_pylist()
    assert rows and out.summary["fraction"] == 0.5 and out.summary["unlocked_problems"] == out.summary["prefixed_problems"]
    assert out.summary["prefixed_problems"] + out.summary["no_prefix"] == out.summary["stuck_problems"] == len(problems)
    backend = TransformersBackend(random_checkpoint)
    for r in rows:
        p = problems[r["problem_id"]]
        assert r["prompt_kind"] == "prefix" and r["guidance"] == prefix_steps(p["reference_solution"], p["answer"], 0.5)
        assert not mentions_answer(r["guidance"], p["answer"])
        if form == "response":  # the plain prompt, the answer begun with the steps
            assert r["prompt"] == plain[r["problem_id"]] + r["guidance"]
        else:
            assert r["guidance"].strip() in r["prompt"] and r["prompt"] != plain[r["problem_id"]]
        assert r["loss_prompt"] == (r["prompt"] if loss == "guided" else plain[r["problem_id"]])
        if loss == "plain":  # the continuation's tokens under the plain prompt, by a direct forward pass
            with torch.no_grad():
                ids = backend.tokenizer(r["loss_prompt"], add_special_tokens=False)["input_ids"]
                logits = backend.model(torch.tensor([ids + r["completion_token_ids"]])).logits[0, len(ids) - 1: -1]
            direct = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(r["completion_token_ids"])[:, None]).squeeze(-1)
            assert torch.allclose(torch.tensor(r["loss_logprobs"]), direct, atol=1e-4)
    # the wrong continuations: kept for a guided group of their own, not kept for LTE's replacement
    wrong = _run(config, tmp_path / "wrong", monkeypatch, prefix, right=False)[2]
    assert wrong.read("prefixed").num_rows == (wrong.summary["sampled"] if loss == "guided" else 0)


def test_the_self_hint_stage_writes_a_hint_that_does_not_state_the_answer_and_samples_with_it(tmp_path, random_checkpoint, monkeypatch):
    config = _config(random_checkpoint, tmp_path, self_hint={"write_samples": 3, "hint_lines": 1}, prompts={"self_hint_write": "tiny_explain"})
    cur, ro, out = _run(config, tmp_path / "ws", monkeypatch, self_hint)
    s, n = out.summary, cur.read("problems").num_rows
    assert s["hints_written"] == 3 * n and s["no_hint"] + len({r["problem_id"] for r in out.read("self_hints").to_pylist()}) == n
    answers = {p["problem_id"]: p["answer"] for p in cur.read("problems").to_pylist()}
    rows = out.read("self_hints").to_pylist()
    assert rows
    for r in rows:
        assert r["prompt_kind"] == "self_hint" and "\n" not in r["guidance"] and not mentions_answer(r["guidance"], answers[r["problem_id"]])
        assert f"Hint: {r['guidance']}" in r["prompt"] and r["loss_prompt"] == r["prompt"]  # loss: guided, the hinted prompt
    # a writer whose every hint states the answer gives no hint, and nothing is sampled
    monkeypatch.setattr(self_hint, "mentions_answer", lambda text, answer: True)
    none = _run(config, tmp_path / "leaky", monkeypatch, self_hint)[2]
    assert none.summary["no_hint"] == n and none.summary["hints_leaked"] == 3 * n and none.read("self_hints").num_rows == 0


def _method(method: str | None, *sets: str):
    raw, preset = read_run_config(ROOT / "configs" / "quickstart.yaml", method, list(sets))
    return parse_config(raw, base_dir=ROOT), preset


@pytest.mark.parametrize("method, stage", [("prefix", "prefix"), ("self-hint", "self_hint")])
def test_the_presets_run_their_stage_alone_and_cite_their_papers(method, stage):
    config, preset = _method(method)
    run = select_stages(round_stages(), config=config, only_used=True)
    assert run == ["curate", "rollouts", "filter", stage, "materialize", "grpo", "eval"]
    assert {"explain", "hint", "grade", "rubric"} <= set(left_out(round_stages(), config=config, only_used=True))
    papers = {"prefix": ("2507.13266", "2601.18779", "2506.17211"), "self-hint": ("2509.25666", "2602.03143")}[method]
    text = (ROOT / "configs" / "presets" / f"{method}.yaml").read_text()
    assert all(p in text for p in papers) and all(source for _, source in preset.values())
    # the other methods leave both out
    grpo, _ = _method("grpo")
    assert {"prefix", "self_hint"} <= set(left_out(round_stages(), config=grpo, only_used=True))


def test_online_rounds_lower_the_prefix_share_by_round():
    from flows.online import round_config

    raw, _ = read_run_config(ROOT / "configs" / "quickstart.yaml", "prefix")
    fractions = [parse_config(round_config(raw, "ckpt" if r > 1 else None, r), base_dir=ROOT).prefix.fraction() for r in (1, 2, 3)]
    assert fractions == [0.5, 0.25, 0.25]


def test_the_verl_export_names_the_guidance_kind(tmp_path, random_checkpoint, monkeypatch):
    from tasks.core.export import guidance_by_problem

    config = _config(random_checkpoint, tmp_path, prefix={"form": "response"})
    out = _run(config, tmp_path / "ws", monkeypatch, prefix)[2]
    guide = guidance_by_problem([out.dataset_path("prefixed")])
    rows = out.read("prefixed").to_pylist()
    assert guide and {kind for kind, _ in guide.values()} == {"prefix"}
    assert all(guide[r["problem_id"]][1] == r["guidance"] for r in rows)
