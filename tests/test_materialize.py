"""The materialize stage: dpo, grpo and sft rows from rollouts, guidance and grades."""

from collections import defaultdict
from pathlib import Path

import pytest

from tasks.registry import parse_config
from tasks.models.token_text import token_step_index
from tasks.stages._advantages import ADVANTAGES, group_advantages, step_advantages
from tasks.stages.materialize import MaterializeConfig, build
from tests.conftest import tiny_config

PLAIN = "<|user|>What is {q}?<|end|><|assistant|>"
HINTED = "<|user|>What is {q}?\nHint: These answers are wrong: 5.<|end|><|assistant|>"
EXPLAIN = "<|user|>What is {q}? The correct answer is 7.<|end|><|assistant|>"


def _row(pid, idx, completion, correct, kind="plain", **extra):
    prompt = {"plain": PLAIN, "hint": HINTED, "explain": EXPLAIN}[kind].format(q=pid)
    return {"sample_id": f"{pid}-{kind}-{idx}", "problem_id": pid, "sample_idx": idx, "prompt": prompt,
            "completion": completion, "completion_token_ids": [ord(c) for c in completion],
            "behaviour_logprobs": [-0.5] * len(completion), "temperature": 1.0, "finish_reason": "stop", "correct": correct,
            "prompt_kind": kind, "loss_prompt": PLAIN.format(q=pid),
            "loss_logprobs": None if kind == "plain" else [-1.5] * len(completion), **extra}


def _config(tmp_path, **mat):
    return tiny_config(tmp_path, materialize=mat)


@pytest.fixture()
def data():
    rollouts = [
        _row("A", 0, "3 + 4 = 7\n\\boxed{7}", True), _row("A", 1, "3 + 4 = 8\n\\boxed{8}", False),
        _row("A", 2, "3 + 4 = 7\n\\boxed{7} ", True), _row("A", 3, "\\boxed{5}", False),
        *[_row("B", i, f"wrong {i}\n\\boxed{{{i}}}", False) for i in range(4)],
        *[_row("C", i, "1 + 1 = 2\n\\boxed{2}", True) for i in range(4)],
    ]
    hints = [_row("B", i, f"3 + 4 = 7 (hinted {i})\n\\boxed{{7}}", True, kind="hint") for i in range(5)]
    explanations = [_row("B", 0, "3 + 4 = 7\n\\boxed{7}", True, kind="explain", selected=True),
                    _row("B", 1, "so 7\n\\boxed{7}", True, kind="explain", selected=False)]
    return rollouts, explanations, hints


def test_guided_prompts_never_reach_prompt_or_loss_prompt(tmp_path, data):
    out, _ = build(_config(tmp_path), *data, grades={})
    assert out["dpo"] and out["grpo"] and out["sft"]
    for row in out["dpo"]:
        assert row["prompt"] == PLAIN.format(q=row["problem_id"])
    for row in out["grpo"]:
        assert row["loss_prompt"] == PLAIN.format(q=row["problem_id"])
    for row in out["sft"]:
        assert row["prompt"] == PLAIN.format(q=row["problem_id"])
    kinds = {(r["problem_id"], r["chosen_kind"]) for r in out["dpo"]}
    assert kinds == {("A", "plain"), ("B", "explain"), ("B", "hint")}
    assert all(r["rejected_kind"] == "plain" and r["chosen"] != r["rejected"] for r in out["dpo"])


def test_grpo_groups_lte_replacement_explanations_and_dynamic_sampling(tmp_path, data):
    out, counts = build(_config(tmp_path), *data, grades={})
    groups = defaultdict(list)
    for r in out["grpo"]:
        groups[r["group_id"]].append(r)
    assert set(groups) == {"g-A", "g-B"} and counts["dropped_groups"] == 1  # C: every sample right, no signal
    for rows in groups.values():  # outcome mode: advantages sum to zero in every group
        assert sum(r["advantage"] for r in rows if r["advantage"] is not None) == pytest.approx(0.0, abs=1e-9)
    b = groups["g-B"]
    guided = [r for r in b if r["prompt_kind"] == "hint"]
    assert len(guided) == 3 and counts["lte_replaced_samples"] == 3  # at most G - 1 of 4
    assert all(r["is_guided"] and r["reward"] == 1.0 and r["advantage"] > 0 for r in guided)
    assert all(r["loss_logprobs"] == [-1.5] * len(r["completion"]) and r["behaviour_logprobs"][0] == -0.5 for r in guided)
    expl = [r for r in b if r["prompt_kind"] == "explain"]
    assert len(expl) == 1 and expl[0]["advantage"] is None and expl[0]["reward"] is None  # only the selected one
    a = sorted(groups["g-A"], key=lambda r: r["sample_id"])
    assert [round(r["advantage"], 4) for r in a] == [1.0, -1.0, 1.0, -1.0]

    kept, counts = build(_config(tmp_path, keep_uniform_groups=True, advantage="dr_grpo", lte_replace=False), *data, grades={})
    c = [r for r in kept["grpo"] if r["group_id"] == "g-C"]
    assert len(c) == 4 and {r["advantage"] for r in c} == {0.0} and counts["uniform_groups"] == 2  # B is uniform too now
    assert [r["advantage"] for r in kept["grpo"] if r["group_id"] == "g-A"] == [0.5, -0.5, 0.5, -0.5]


def test_judge_rewards_mask_unparsed_grades_and_give_token_advantages(tmp_path, data):
    from tasks.models.tiny_policy import build_tokenizer

    rollouts = data[0][:4]
    grades = {
        "A-plain-0": {"parse_ok": True, "outcome_score": 1.0, "step_scores": [0.5, 1.0], "steps": ["3 + 4 = 7", "\\boxed{7}"]},
        "A-plain-1": {"parse_ok": True, "outcome_score": 0.25, "step_scores": [0.25, 0.25], "steps": ["3 + 4 = 8", "\\boxed{8}"]},
        "A-plain-2": {"parse_ok": False, "outcome_score": None, "step_scores": None, "steps": []},
        "A-plain-3": {"parse_ok": True, "outcome_score": 0.0, "step_scores": [0.0], "steps": ["\\boxed{5}"]},
    }
    out, counts = build(_config(tmp_path, reward="judge"), rollouts, [], [], grades, tokenizer=build_tokenizer())
    rows = {r["sample_id"]: r for r in out["grpo"]}
    assert rows["A-plain-2"]["reward"] is None and rows["A-plain-2"]["advantage"] is None and counts["masked_samples"] == 1
    assert sum(r["advantage"] for r in rows.values() if r["advantage"] is not None) == pytest.approx(0.0, abs=1e-9)
    ta = rows["A-plain-0"]["token_advantages"]
    assert len(ta) == len(rollouts[0]["completion"])
    # "3 + 4 = 7\n" belongs to step 1 (s_1 - s_T = -0.5), "\boxed{7}" to step 2 (s_2 - s_1 = 0.5)
    assert ta[:9] == [-0.5] * 9 and ta[-9:] == [0.5] * 9


def test_step_and_token_helpers():
    assert step_advantages([0.25, 0.5, 1.0]) == [-0.75, 0.25, 0.5]
    assert token_step_index("ab\ncd", [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)], ["ab", "cd"]) == [0, 0, 0, 1, 1]
    assert group_advantages([1.0, 0.0, None]) == pytest.approx([1.0, -1.0, None], abs=1e-5)


def test_pair_kinds_give_pure_exp_dpo(tmp_path, data):
    out, _ = build(_config(tmp_path, dpo_pairs=["explain"]), *data, grades={})
    assert out["dpo"] and {r["chosen_kind"] for r in out["dpo"]} == {"explain"}


def test_lte_replaces_randomly_chosen_failed_samples_seeded(tmp_path, data):
    def replaced(seed):
        out, _ = build(_config(tmp_path, seed=seed), *data, grades={})
        b = sorted((r for r in out["grpo"] if r["group_id"] == "g-B" and r["prompt_kind"] != "explain"), key=lambda r: r["sample_id"])
        return tuple(sorted(int(r["sample_id"].rsplit("-", 1)[1]) for r in b if r["prompt_kind"] == "plain"))  # the one kept

    kept = {seed: replaced(seed) for seed in range(8)}
    assert all(len(k) == 1 for k in kept.values())  # 3 of 4 replaced, one failed plain sample stays
    assert replaced(3) == kept[3]  # seeded
    assert len(set(kept.values())) > 1  # not always the same (the old code always kept the last one)


def test_process_mode_keeps_groups_whose_steps_differ_and_single_steps_get_s1(tmp_path, data):
    from tasks.models.tiny_policy import build_tokenizer

    assert step_advantages([0.75]) == [0.75]  # the authors: step 1 gets s_1
    rollouts = [_row("D", i, "3 + 4 = 8\n\\boxed{8}", False) for i in range(2)]
    # same outcome score, different step scores: all-fail group, yet the first step of D-0 was right
    grades = {"D-plain-0": {"parse_ok": True, "outcome_score": 0.0, "step_scores": [1.0, 0.0], "steps": ["3 + 4 = 8", "\\boxed{8}"]},
              "D-plain-1": {"parse_ok": True, "outcome_score": 0.0, "step_scores": [0.0, 0.0], "steps": ["3 + 4 = 8", "\\boxed{8}"]}}
    out, counts = build(_config(tmp_path, reward="judge"), rollouts, [], [], grades, tokenizer=build_tokenizer())
    assert counts.get("dropped_groups", 0) == 0 and len(out["grpo"]) == 2
    assert any(a != 0 for a in out["grpo"][0]["token_advantages"])
    # the stuck groups with a process signal are counted: D has one, E (every step wrong in both samples) none
    rollouts += [_row("E", i, "3 + 4 = 9\n\\boxed{9}", False) for i in range(2)]
    grades.update({f"E-plain-{i}": {"parse_ok": True, "outcome_score": 0.0, "step_scores": [0.0, 0.0], "steps": ["3 + 4 = 9", "\\boxed{9}"]}
                   for i in range(2)})
    _, counts = build(_config(tmp_path, reward="judge"), rollouts, [], [], grades, tokenizer=build_tokenizer())
    assert counts["all_fail_groups"] == 2 and counts["all_fail_groups_with_token_advantages"] == 1 and counts["dropped_groups"] == 1


def test_process_mode_without_a_tokenizer_is_an_error(tmp_path):
    from tasks.stages.materialize import policy_tokenizer

    config = parse_config({"problems": {"sources": [{"file": "x.jsonl"}]}, "materialize": {"reward": "judge"},
                           "policy": {"model": "served-model", "backend": "openai"}}, base_dir=tmp_path)
    with pytest.raises(ValueError, match="needs the policy's tokenizer"):
        policy_tokenizer(config)
    config.judge.mode = "outcome"
    assert policy_tokenizer(config) is None


def test_overlong_traces_get_reward_zero_unless_graded(tmp_path):
    rollouts = [_row("E", 0, "3 + 4 = 7\n\\boxed{7}", True), _row("E", 1, "3 + 4 = 7 and so on and", False, finish_reason="length")]
    grades = {"E-plain-0": {"parse_ok": True, "outcome_score": 0.5, "step_scores": None, "steps": []},
              "E-plain-1": {"parse_ok": True, "outcome_score": 0.75, "step_scores": None, "steps": []}}
    cfg = parse_config({"problems": {"sources": [{"file": "x.jsonl"}]}, "materialize": {"reward": "judge"},
                        "judge": {"mode": "outcome"}}, base_dir=tmp_path)
    out, _ = build(cfg, rollouts, [], [], grades)
    assert {r["sample_id"]: r["reward"] for r in out["grpo"]} == {"E-plain-0": 0.5, "E-plain-1": 0.0}
    cfg.judge.overlong = "grade"
    out, _ = build(cfg, rollouts, [], [], grades)
    assert {r["sample_id"]: r["reward"] for r in out["grpo"]} == {"E-plain-0": 0.5, "E-plain-1": 0.75}


def test_explanations_of_every_problem_ride_along_when_explain_covers_all(tmp_path, data):
    """`explain.problems: all` explains solved problems too; their selected explanations reach the ExPO term."""
    rollouts, explanations, hints = data
    on_a = _row("A", 0, "3 + 4 = 7\n\\boxed{7}", True, kind="explain", selected=True)  # A is solved: not stuck
    out, counts = build(_config(tmp_path), rollouts, explanations + [on_a], hints, grades={})
    expl = {r["problem_id"] for r in out["grpo"] if r["prompt_kind"] == "explain"}
    assert expl == {"A", "B"} and counts["explanation_rows"] == 2


@pytest.mark.slow
def test_chunks_of_whole_problems_give_the_rows_of_one_pass_in_order(finished_quickstart, tmp_path, monkeypatch):
    """The stage works one chunk of whole problems at a time (tasks/core/groups.py): with chunks of
    40 rollouts (the quickstart's 7 groups of 8 → several chunks, their parts written as they go) every
    dataset has the rows of the one-chunk run, in the same order, and the same summary; the store holds
    one part file per chunk that has rows."""
    import shutil

    import pyarrow.dataset as pads

    from tasks.core.config import read_yaml
    from tasks.core.store import Store, data_files
    from tasks.registry import REGISTRY
    from tasks.stages import materialize

    ws = tmp_path / "ws"
    shutil.copytree(finished_quickstart["workspace"], ws)
    root = Path(__file__).resolve().parents[1]
    config = parse_config(read_yaml(root / "configs" / "quickstart.yaml"), base_dir=root)
    store = Store(ws)
    # (every guidance the quickstart ran: prefix and self_hint are not among them)
    upstream = {s: outs[0] for s in (*REGISTRY["materialize"].upstream, *REGISTRY["materialize"].optional_upstream)
                if (outs := store.outputs(s))}
    rollouts = upstream["rollouts"].manifest["datasets"]["rollouts"]["num_rows"]

    def run(chunk_rows):
        monkeypatch.setattr(materialize, "CHUNK_ROWS", chunk_rows)
        monkeypatch.setattr(materialize, "PART_BYTES", 1)  # a part file per chunk
        out, _ = REGISTRY["materialize"].run(config, store, upstream, force=True)
        tables = {n: pads.dataset([str(f) for f in data_files(out.dataset_path(n))]).to_table() for n in ("dpo", "grpo", "sft")}
        return out, tables

    whole, whole_tables = run(10 * rollouts)
    assert all(len(data_files(whole.dataset_path(n))) == 1 for n in whole_tables)
    chunked, chunked_tables = run(40)
    assert len(data_files(chunked.dataset_path("grpo"))) > 2
    for name, table in whole_tables.items():
        assert table.num_rows > 0
        assert chunked_tables[name].to_pylist() == table.to_pylist(), name
    assert chunked.summary == whole.summary
    # the rows the update will train on, counted as they were written (the grpo stage uses this, not a query)
    from tasks.core.schemas import kind_counts

    by_kind = whole.summary["grpo"]["rows_by_kind"]
    assert by_kind == kind_counts(whole.scan("grpo")) and sum(by_kind.values()) == whole_tables["grpo"].num_rows


def test_the_advantage_estimators_are_registered_by_the_names_the_config_takes_and_match_hand_computed_values():
    """materialize.advantage names an estimator of the registry (verl's core_algos pattern). Rewards 1, 0, 0, 1, masked:
    mean 0.5, population std 0.5; grpo (r − mean)/(std + 1e-6) = ±0.999998; dr_grpo r − mean = ±0.5; the masked row none."""
    from typing import get_args

    assert set(get_args(MaterializeConfig.model_fields["advantage"].annotation)) == set(ADVANTAGES) == {"grpo", "dr_grpo"}
    rewards = [1.0, 0.0, 0.0, 1.0, None]
    assert group_advantages(rewards, "grpo") == pytest.approx([0.5 / 0.500001, -0.5 / 0.500001, -0.5 / 0.500001, 0.5 / 0.500001, None])
    assert group_advantages(rewards, "dr_grpo") == [0.5, -0.5, -0.5, 0.5, None]
    assert group_advantages([None, None], "grpo") == [None, None]
