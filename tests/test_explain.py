import torch

import tasks.stages.rollouts as rollouts_mod
from tasks.core.store import Store
from tasks.models.transformers_backend import TransformersBackend
from tasks.stages import curate, explain
from tasks.stages import filter as filter_stage
from tasks.stages.explain import answer_text, explanation_ids, select
from tests.conftest import chain_sum, tiny_config


def _config(checkpoint, tmp_path, **explain_cfg):
    return tiny_config(tmp_path, checkpoint=checkpoint, problems={"sources": [chain_sum(8, 4, "hard", digits=2)], "eval_fraction": 0.0},
                       rollouts={"samples_per_problem": 2, "max_new_tokens": 6, "temperature": 0.8},
                       explain={"samples_per_problem": 3, **explain_cfg})


def _stage(config, ws, monkeypatch, explain_correct, solved=()):
    """curate -> rollouts -> filter -> explain with the random policy; the checker is replaced so
    that plain samples are wrong (but those of the problems in `solved`) and explanations are
    right when `explain_correct`."""
    store = Store(ws)
    cur, _ = curate.STAGE.run(config, store)
    monkeypatch.setattr(rollouts_mod, "check", lambda t, p: ("0", p["problem_id"] in solved))
    ro, _ = rollouts_mod.STAGE.run(config, store, {"curate": cur})
    monkeypatch.setattr(rollouts_mod, "check", lambda t, p: (p["answer"], explain_correct))
    fil, _ = filter_stage.STAGE.run(config, store, {"curate": cur, "rollouts": ro})
    out, _ = explain.STAGE.run(config, store, {"curate": cur, "rollouts": ro, "filter": fil})
    return cur, ro, out


def _logp(model, tok, prompt: str, ids: list[int], temperature=1.0) -> torch.Tensor:
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([p_ids + ids])).logits[0, len(p_ids) - 1 : -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)


def test_scores_and_loss_logprobs_match_a_direct_computation(tmp_path, random_checkpoint, monkeypatch):
    config = _config(random_checkpoint, tmp_path)
    cur, ro, out = _stage(config, tmp_path / "ws", monkeypatch, explain_correct=True)
    rows = out.read("explanations").to_pylist()
    problems = {p["problem_id"]: p for p in cur.read("problems").to_pylist()}
    assert len(rows) == 3 * len(problems)
    be = TransformersBackend(random_checkpoint)
    plain = {r["problem_id"]: r["prompt"] for r in ro.read("rollouts").to_pylist()}
    for r in rows[:6]:
        ans = problems[r["problem_id"]]["answer"]
        assert r["prompt_kind"] == "explain" and r["guidance"] == ans
        assert f"Answer: {ans}." in r["prompt"] and r["loss_prompt"] == plain[r["problem_id"]] and "Answer:" not in r["loss_prompt"]
        # loss side: the same tokens under the answer-free prompt, at the sampling temperature
        direct = _logp(be.model, be.tokenizer, r["loss_prompt"], r["completion_token_ids"], 0.8)
        assert torch.allclose(torch.tensor(r["loss_logprobs"]), direct, atol=1e-4)
        # (a) log-likelihood of the explanation under the original prompt, temperature 1
        ll = _logp(be.model, be.tokenizer, r["loss_prompt"], r["completion_token_ids"])
        assert abs(r["explain_loglik_total"] - ll.sum().item()) < 1e-3
        assert abs(r["explain_loglik"] - ll.mean().item()) < 1e-4
        # (b) how much the explanation raises log p(\boxed{answer})
        a_ids = be.tokenizer(answer_text(ans), add_special_tokens=False)["input_ids"]
        # the explanation's sampled ids before the first that decodes past its last \boxed (prefixes decoded)
        ids, cut = r["completion_token_ids"], r["completion"].rfind("\\boxed")
        k = next((k for k in range(len(ids)) if cut >= 0 and len(be.tokenizer.decode(ids[:k + 1], skip_special_tokens=True)) > cut),
                 len(ids))
        with_e = _logp(be.model, be.tokenizer, r["loss_prompt"], ids[:k] + a_ids)[k:].sum().item()
        without = _logp(be.model, be.tokenizer, r["loss_prompt"], a_ids).sum().item()
        assert abs(r["explain_answer_gain"] - (with_e - without)) < 1e-3
    # one selected per problem: the highest per-token log-likelihood
    for pid in problems:
        group = [r for r in rows if r["problem_id"] == pid]
        (chosen,) = [r for r in group if r["selected"]]
        assert chosen["explain_loglik"] == max(r["explain_loglik"] for r in group)


def test_wrong_explanations_are_not_kept_and_are_listed(tmp_path, random_checkpoint, monkeypatch):
    config = _config(random_checkpoint, tmp_path)
    cur, _, out = _stage(config, tmp_path / "ws", monkeypatch, explain_correct=False)
    assert out.read("explanations").num_rows == 0
    s = out.summary
    assert s["sampled"] == 3 * cur.read("problems").num_rows and s["kept"] == 0 and s["unlocked_fraction"] == 0.0
    assert sorted(s["unexplained_problems"]) == sorted(cur.read("problems").column("problem_id").to_pylist())


def test_selection_rules():
    rows = [{"problem_id": "p", "sample_idx": i, "explain_loglik": ll, "explain_answer_gain": g}
            for i, (ll, g) in enumerate([(-1.0, 0.5), (-0.5, 0.1), (-2.0, 3.0)])]
    select(rows, "loglik")
    assert [r["selected"] for r in rows] == [False, True, False]
    select(rows, "answer_gain")
    assert [r["selected"] for r in rows] == [False, False, True]
    select(rows, "all")
    assert all(r["selected"] for r in rows)


def test_explanation_ids_end_before_the_last_boxed_answer():
    from tasks.models.tiny_policy import build_tokenizer

    tok = build_tokenizer()
    ids = tok("1 + 2 = 3\n\\boxed{3}<|end|>", add_special_tokens=False)["input_ids"]
    assert explanation_ids(tok, ids) == tok("1 + 2 = 3\n", add_special_tokens=False)["input_ids"]
    assert explanation_ids(tok, ids[:5]) == ids[:5]  # no boxed answer: all of it


def test_explain_works_on_the_problems_filter_kept(tmp_path, random_checkpoint, monkeypatch):
    """One concept, one place: "stuck" is filter's band, and explain follows it."""
    config = _config(random_checkpoint, tmp_path)
    ids = sorted(curate.STAGE.run(config, Store(tmp_path / "probe"))[0].read("problems").column("problem_id").to_pylist())
    solved = {ids[0]}  # every plain sample of this problem is right: not stuck
    _, _, out = _stage(config, tmp_path / "stuck", monkeypatch, explain_correct=True, solved=solved)
    explained = {r["problem_id"] for r in out.read("explanations").to_pylist()}
    assert explained == set(ids) - solved and out.summary["stuck_problems"] == len(ids) - 1

    wide = _config(random_checkpoint, tmp_path)
    wide.filter.max_pass_rate = 1.0  # filter keeps every problem, solved or not: explain explains them all
    _, _, out = _stage(wide, tmp_path / "wide", monkeypatch, explain_correct=True, solved=solved)
    assert {r["problem_id"] for r in out.read("explanations").to_pylist()} == set(ids)
    assert out.summary["stuck_problems"] == len(ids)


def test_explanations_that_lean_on_the_shown_answer_are_flagged_and_never_selected():
    from tasks.stages.explain import leans_on_the_answer

    assert leans_on_the_answer("As given, the answer is 68.\n\\boxed{68}")
    assert leans_on_the_answer("We are told the result is 68, so 23 + 45 = 68")
    assert not leans_on_the_answer("23 + 45 = 68\n\\boxed{68}")
    rows = [{"problem_id": "p", "sample_idx": i, "explain_loglik": ll, "explain_answer_gain": 0.0, "leaks_answer": leak}
            for i, (ll, leak) in enumerate([(-0.1, True), (-0.5, False), (-0.9, False)])]
    select(rows, "loglik")  # the likeliest one leans on the answer: the next is chosen
    assert [r["selected"] for r in rows] == [False, True, False]
    select(rows, "all")
    assert [r["selected"] for r in rows] == [False, True, True]
