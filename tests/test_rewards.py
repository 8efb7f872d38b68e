"""guidedrl's rewards inside other trainers (tasks/models/rewards.py): TRL's own GRPOTrainer scores our TRL export with
the verifier and the ExpRL judge and logs what `grade`'s judge gives the same completions; verl's own loader loads
``compute_score`` from its file and scores rows of our verl export; a judge failure is never a reward."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
import yaml

from tasks.core.export import REWARDS_MODULE, export
from tasks.core.store import Store
from tasks.models import answers, judge
from tasks.models.rewards import Rewards, compute_score, trl_async_reward_functions, trl_reward_functions
from tasks.registry import parse_config
from tasks.stages import curate
from tests.conftest import chain_sum
from tests.openai_server import OpenAIServer


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    """A curated problems dataset (reasoning-gym chain sums), as the pipeline writes it."""
    ws = tmp_path_factory.mktemp("rewards-ws")
    config = parse_config({"workspace": str(ws), "problems": {"sources": [chain_sum(24, 5, "easy")], "eval_fraction": 0.25}})
    out, _ = curate.STAGE.run(config, Store(ws))
    return out


@pytest.fixture(scope="module")
def word_problems(tmp_path_factory):
    """Problems whose answer and reference hold no number: the stand-in judge scores a trace 5 when it holds no number
    either (its last number is the reference's: none), else 1 — so short random completions get rewards of both kinds."""
    ws = tmp_path_factory.mktemp("rewards-words")
    colours = ["blue", "green", "red", "white", "black", "grey", "pink", "brown"]
    rows = [{"question": f"What colour is thing {chr(97 + i)}?", "answer": c, "reference_solution": f"Thing {chr(97 + i)} is {c}."}
            for i, c in enumerate(colours)]
    (ws / "words.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = parse_config({"workspace": str(ws), "problems": {"sources": [{"file": str(ws / "words.jsonl"), "split": "train"}]}})
    out, _ = curate.STAGE.run(config, Store(ws))
    return out


def _settings(tmp_path, **judge_settings) -> str:
    path = tmp_path / "rewards.yaml"
    path.write_text(yaml.safe_dump({"workspace": str(tmp_path / "ws"), "judge": {"mode": "outcome", **judge_settings},
                                    "problems": {"sources": [chain_sum(4, 0)]}}))  # (other sections are left alone)
    return str(path)


def _grade_rows(settings: str, problem_rows: list[dict], completions: list[str], workspace=None) -> list[dict]:
    """What `grade`'s judge gives these completions: the judge `grade` makes of the same settings (``judge.make_judge``), on traces
    as ``grade.load_traces`` builds them (the reference shown to the judge, the verifier's `correct`)."""
    config = parse_config(yaml.safe_load(open(settings)))
    traces = [judge.Trace(f"s{i}", p["problem_id"], p["question"], judge.reference_text(p), judge.judge_view(c),
                          answers.check(c, {"answer": p["answer"]})[1]) for i, (p, c) in enumerate(zip(problem_rows, completions))]
    return judge.make_judge(config, workspace or config.workspace_dir()).grade(traces)


def _recording(fn, log):
    """``fn`` (sync or async, as TRL tells them apart) with each call's completions and rewards written to ``log``."""
    import inspect

    def note(completions, kwargs, out):
        log.append({"completions": [c[0]["content"] if isinstance(c, list) else c for c in completions],
                    "problem_id": list(kwargs["problem_id"]), "rewards": out})
        return out

    if inspect.iscoroutinefunction(fn):
        async def recorded(prompts, completions, **kwargs):
            return note(completions, kwargs, await fn(prompts, completions, **kwargs))
    else:
        def recorded(prompts, completions, **kwargs):
            return note(completions, kwargs, fn(prompts, completions, **kwargs))
    recorded.__name__ = fn.__name__
    return recorded


def _train_grpo(dataset_dir, policy, reward_funcs, out_dir):
    """TRL's own GRPOTrainer, 2 steps on CPU, on our TRL export."""
    from datasets import load_dataset
    from trl import GRPOConfig, GRPOTrainer

    train = load_dataset("parquet", data_files={"train": str(dataset_dir / "train.parquet")})["train"]
    args = GRPOConfig(output_dir=str(out_dir), max_steps=2, per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=6, learning_rate=1e-5, logging_steps=1, report_to="none", use_cpu=True,
                      save_strategy="no", seed=0, beta=0.0)
    trainer = GRPOTrainer(model=str(policy), reward_funcs=reward_funcs, train_dataset=train, args=args)
    trainer.train()
    return trainer.state.log_history


@pytest.mark.parametrize("judge_kind", ["rule", "llm", "llm-async"])
def test_trl_grpo_trainer_logs_the_rewards_grade_gives(request, random_checkpoint, tmp_path, judge_kind):
    """Our TRL export and our reward functions in TRL's own GRPOTrainer: the verifier's rewards are the answer check's,
    the judge's are `grade`'s outcome scores for the same completions (the rule judge; an LLM judge behind the
    stand-in OpenAI server, with rewards of both kinds), and what TRL logs is their mean."""
    # the rule judge needs references with checkable results (chain sums); the LLM judge gets word problems
    dest, problems = tmp_path / "trl", request.getfixturevalue("problems" if judge_kind == "rule" else "word_problems")
    export(problems.path / "problems", "trl", dest)
    assert {"prompt", "answer", "reference_solution"} <= set(pq.read_schema(dest / "train.parquet").names)
    assert "trl_reward_functions" in (dest / "reward.py").read_text()
    with OpenAIServer() as server:
        settings = _settings(tmp_path, **({} if judge_kind == "rule" else {
            "backend": "openai", "model": "judge-model", "base_url": server.base_url, "max_retries": 0}))
        verifier, judge_fn = (trl_async_reward_functions if judge_kind.endswith("async") else trl_reward_functions)(settings)
        log_v, log_j = [], []
        history = _train_grpo(dest, random_checkpoint, [_recording(verifier, log_v), _recording(judge_fn, log_j)], tmp_path / "out")
        by_id = {p["problem_id"]: p for p in problems.read("problems").to_pylist()}
        assert len(log_j) == 2 and all(len(call["rewards"]) == 4 for call in log_j)
        for call_v, call_j in zip(log_v, log_j):
            rows = [by_id[pid] for pid in call_j["problem_id"]]
            graded = _grade_rows(settings, rows, call_j["completions"], workspace=tmp_path / "fresh-cache")
            assert call_j["rewards"] == [r["outcome_score"] for r in graded] and all(r["parse_ok"] for r in graded)
            assert call_v["rewards"] == [float(answers.check(c, {"answer": p["answer"]})[1]) for c, p in zip(call_v["completions"], rows)]
        logged = [h["rewards/guidedrl_judge/mean"] for h in history if "rewards/guidedrl_judge/mean" in h]
        assert len(logged) == 2
        for mean, call in zip(logged, log_j):
            assert math.isclose(mean, sum(call["rewards"]) / len(call["rewards"]), rel_tol=1e-5, abs_tol=1e-6)
        if judge_kind != "rule":
            assert len(server.behaviour.requests) >= 8  # every completion went to the judge over HTTP
            assert {r for call in log_j for r in call["rewards"]} == {0.0, 1.0}  # (both kinds: the check can fail)


def test_a_judge_failure_is_no_reward(problems, tmp_path):
    """A judge whose reply does not parse, or that fails (500s, no retries), gives TRL None, never 0; verl's
    compute_score raises."""
    rows = problems.read("problems").to_pylist()[:3]
    prompts = [[{"role": "user", "content": p["question"]}] for p in rows]
    completions = [[{"role": "assistant", "content": p["reference_solution"]}] for p in rows]
    columns = {"answer": [p["answer"] for p in rows], "reference_solution": [p["reference_solution"] for p in rows]}
    with OpenAIServer() as server:
        settings = _settings(tmp_path, backend="openai", model="judge-model", base_url=server.base_url, max_retries=0)
        _, judge_fn = trl_reward_functions(settings)
        ok = judge_fn(prompts, completions, **columns)
        assert all(isinstance(r, float) for r in ok) and max(ok) > 0
        nonsense = [[{"role": "assistant", "content": "JUDGE-NONSENSE " + p["reference_solution"]}] for p in rows]
        assert judge_fn(prompts, nonsense, **columns) == [None] * 3  # a reply that does not parse, even after the reminder
        server.behaviour.refuse_status = 500
        failing = {**yaml.safe_load(open(settings)), "workspace": str(tmp_path / "other")}  # (a workspace with no cached replies)
        _, judge_fn = trl_reward_functions(failing)
        assert judge_fn(prompts, completions, **columns) == [None] * 3
        other = tmp_path / "failing.yaml"
        other.write_text(yaml.safe_dump(failing))
        with pytest.raises(judge.JudgeError, match="no judge reward"):
            compute_score("chain_sum", rows[0]["reference_solution"], rows[0]["answer"],
                          {"question": rows[0]["question"], "problem_id": rows[0]["problem_id"]}, settings=str(other), reward="judge")


def test_verl_loads_compute_score_from_our_file_and_scores_our_export(problems, tmp_path):
    """verl's own loader (get_custom_reward_fn, as `reward.custom_reward_function` in its trainer config) loads
    compute_score from the file our verl export's reward.yaml names, and scores that export's rows: the verifier as the
    answer check, the judge as `grade`'s judge."""
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import get_custom_reward_fn

    dest = tmp_path / "verl"
    export(problems.path / "problems", "verl", dest)
    snippet = yaml.safe_load((dest / "reward.yaml").read_text())["reward"]["custom_reward_function"]
    assert snippet["path"] == str(REWARDS_MODULE) and snippet["name"] == "compute_score"
    settings = _settings(tmp_path)
    by_id = {p["problem_id"]: p for p in problems.read("problems").to_pylist()}
    rows = pq.read_table(dest / "train.parquet").to_pylist()[:6]
    for reward in ("verifier", "judge"):
        cfg = OmegaConf.create({"reward": {"custom_reward_function": {**snippet, "reward_kwargs": {"settings": settings, "reward": reward}}}})
        fn = get_custom_reward_fn(cfg)
        # half the responses right (the reference's worked solution), half wrong
        responses = [by_id[r["extra_info"]["problem_id"]]["reference_solution"] if i % 2 == 0 else "12 + 3 = 15\nThe answer is 15."
                     for i, r in enumerate(rows)]
        scores = [fn(data_source=r["data_source"], solution_str=s, ground_truth=r["reward_model"]["ground_truth"], extra_info=r["extra_info"])
                  for r, s in zip(rows, responses)]
        if reward == "verifier":
            assert [s["score"] for s in scores] == [float(answers.check(s, {"answer": r["reward_model"]["ground_truth"]})[1])
                                                    for r, s in zip(rows, responses)]
            assert [s["score"] for s in scores][::2] == [1.0] * 3
        else:
            graded = _grade_rows(settings, [by_id[r["extra_info"]["problem_id"]] for r in rows], responses)
            assert [s["score"] for s in scores] == [g["outcome_score"] for g in graded]
            assert all(json.loads(s["analysis"]) for s in scores)  # the rule judge's analysis: what was reached


def test_reward_settings_come_from_a_config_file_or_a_dict(tmp_path):
    settings = _settings(tmp_path, backend="rule", mode="process")
    assert Rewards(settings).config.judge.mode == "process" and Rewards({"judge": {"mode": "outcome"}}).config.judge.mode == "outcome"
    assert Rewards().judge.name == "rule"
    with pytest.raises(Exception, match="judge.mode"):
        Rewards({"judge": {"mode": "sometimes"}})


@pytest.mark.parametrize("step_split", ["lines", "###"])
def test_verl_process_reward_manager_places_expRL_token_advantages(problems, random_checkpoint, tmp_path, step_split):
    """verl's own loader (reward.reward_manager source importlib) loads our ProcessRewardManager from its file; on
    rows of our verl export its token-level tensor is, token for token, our token_advantages (materialize's function)
    of `grade`'s process grades for the same responses, steps cut on the policy's tokenizer as grade cuts them."""
    import asyncio

    import numpy as np
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl import DataProto
    from verl.trainer.ppo.reward import resolve_reward_manager_cls

    from tasks.models.rewards_verl import __file__ as manager_file
    from tasks.stages._advantages import token_advantages

    dest = tmp_path / "verl"
    export(problems.path / "problems", "verl", dest)
    rows = pq.read_table(dest / "train.parquet").to_pylist()[:4]
    settings = _settings(tmp_path, mode="process", step_split=step_split)
    config = OmegaConf.create({"reward": {
        "reward_manager": {"source": "importlib", "name": "ProcessRewardManager", "module": {"path": manager_file}},
        "custom_reward_function": {"reward_kwargs": {"settings": settings}}}})
    manager = resolve_reward_manager_cls(config)(config=config, tokenizer=(tok := AutoTokenizer.from_pretrained(str(random_checkpoint))),
                                                compute_score=None)
    by_id = {p["problem_id"]: p for p in problems.read("problems").to_pylist()}
    sep = "\n###\n" if step_split == "###" else "\n"
    # responses that reach some of the reference's checkpoints, and miss others
    responses = [sep.join(["1 + 1 = 3"] + by_id[r["extra_info"]["problem_id"]]["reference_solution"].splitlines()[: 1 + i % 2])
                 for i, r in enumerate(rows)]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in responses]
    width, prompt = max(map(len, ids)) + 3, [[5, 6]] * len(rows)
    responses_t = torch.tensor([i + [0] * (width - len(i)) for i in ids])
    mask = torch.tensor([[1, 1] + [1] * len(i) + [0] * (width - len(i)) for i in ids])
    data = DataProto.from_dict(tensors={"prompts": torch.tensor(prompt), "responses": responses_t, "attention_mask": mask},
                               non_tensors={"data_source": np.array([r["data_source"] for r in rows], dtype=object),
                                            "reward_model": np.array([r["reward_model"] for r in rows], dtype=object),
                                            "extra_info": np.array([r["extra_info"] for r in rows], dtype=object)})
    outputs = [asyncio.run(manager.run_single(data[i : i + 1])) for i in range(len(rows))]
    tensor = type(manager).assemble_rm_scores(data, [o["reward_score"] for o in outputs])

    config_g = parse_config(yaml.safe_load(open(settings)))
    traces = [judge.Trace(f"s{i}", p["problem_id"], p["question"], judge.reference_text(p), judge.judge_view(t),
                          answers.check(t, {"answer": p["answer"]})[1],
                          steps=[judge.judge_view(s) for s in judge.completion_steps(tok, t, i_)[0]] if step_split == "###" else None)
              for i, (p, t, i_) in enumerate(zip([by_id[r["extra_info"]["problem_id"]] for r in rows], responses, ids))]
    graded = judge.make_judge(config_g, tmp_path).grade(traces)
    for k, (t, i_, g) in enumerate(zip(responses, ids, graded)):
        expected = token_advantages({"completion": t, "completion_token_ids": i_}, g, tok, step_split)
        assert expected is not None and len(set(expected)) > 1  # steps of different credit
        assert tensor[k, : len(i_)].tolist() == pytest.approx(expected) and not tensor[k, len(i_):].any()
