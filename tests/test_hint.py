import torch

import tasks.stages.rollouts as rollouts_mod
from tasks.core.store import Store
from tasks.models.transformers_backend import TransformersBackend
from tasks.stages import curate, hint
from tasks.stages import filter as filter_stage
from tasks.stages.hint import build_hint
from tests.conftest import chain_sum, tiny_config


def _row(correct=False, answer="5", finish="stop"):
    return {"correct": correct, "extracted_answer": answer, "finish_reason": finish}


def test_lte_fires_only_when_every_rollout_failed_and_picks_the_hint_kind():
    assert build_hint([_row(), _row(correct=True, answer="7")]) is None  # one correct rollout: no hint
    assert build_hint([_row(answer="5"), _row(answer="3"), _row(answer="5")]) == ("These answers are wrong: 5, 3.", "wrong_answers")
    assert build_hint([_row(finish="length", answer=None)] * 3) == ("Be concise.", "concise")
    assert build_hint([_row(answer="4"), _row(finish="length", answer="9")]) == ("These answers are wrong: 4. Be concise.", "both")
    assert build_hint([_row(answer=None)] * 2) is None  # nothing to learn from
    assert build_hint([_row(finish="error", answer=None)] * 2) is None
    assert build_hint([_row(answer=str(i)) for i in range(9)], max_wrong=3)[0] == "These answers are wrong: 0, 1, 2."
    # LTE uses every distinct wrong answer (hint.max_wrong_answers: null, the default)
    assert build_hint([_row(answer=str(i)) for i in range(9)])[0] == "These answers are wrong: 0, 1, 2, 3, 4, 5, 6, 7, 8."


def _config(checkpoint, tmp_path, **extra):
    return tiny_config(tmp_path, checkpoint=checkpoint, problems={"sources": [chain_sum(12, 4, "easy", digits=2)], "eval_fraction": 0.0},
                       rollouts={"samples_per_problem": 3, "max_new_tokens": 6, "shard_size": 8}, **extra)


def _stage(config, ws, monkeypatch, hinted_correct=True, plain_correct_ids=()):
    """Run curate, rollouts, filter and hint. The random policy never answers right, so the
    checker is replaced: plain samples are wrong (except for `plain_correct_ids`), and
    hinted samples are right when `hinted_correct` — what is tested is the plumbing."""
    real = rollouts_mod.check

    def fake_check(text, problem):
        return (real(text, problem)[0] or "0", False)

    store = Store(ws)
    cur, _ = curate.STAGE.run(config, store)
    monkeypatch.setattr(rollouts_mod, "check", lambda t, p: (fake_check(t, p)[0], p["problem_id"] in plain_correct_ids))
    ro, _ = rollouts_mod.STAGE.run(config, store, {"curate": cur})
    monkeypatch.setattr(rollouts_mod, "check", lambda t, p: (fake_check(t, p)[0], hinted_correct))
    fil, _ = filter_stage.STAGE.run(config, store, {"curate": cur, "rollouts": ro})
    out, _ = hint.STAGE.run(config, store, {"curate": cur, "rollouts": ro, "filter": fil})
    return cur, ro, out


def test_loss_logprobs_are_under_the_prompt_without_the_hint(tmp_path, random_checkpoint, monkeypatch):
    config = _config(random_checkpoint, tmp_path)
    cur, ro, out = _stage(config, tmp_path / "ws", monkeypatch)
    rows = out.read("hints").to_pylist()
    n_problems = cur.read("problems").num_rows
    assert len(rows) == 3 * n_problems and out.summary["unlocked_fraction"] == 1.0
    backend = TransformersBackend(random_checkpoint)
    plain = {r["problem_id"]: r["prompt"] for r in ro.read("rollouts").to_pylist()}
    for r in rows:
        assert r["prompt_kind"] == "hint" and (r["guidance"] == "Be concise." or r["guidance"].startswith("These answers are wrong: "))
        assert r["guidance"] in r["prompt"] and r["guidance"] not in r["loss_prompt"]
        assert r["loss_prompt"] == plain[r["problem_id"]]
        # a direct forward pass of the same tokens under the plain prompt ...
        with torch.no_grad():
            p_ids = backend.tokenizer(r["loss_prompt"], add_special_tokens=False)["input_ids"]
            logits = backend.model(torch.tensor([p_ids + r["completion_token_ids"]])).logits[0, len(p_ids) - 1 : -1]
        direct = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(r["completion_token_ids"])[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(r["loss_logprobs"]), direct, atol=1e-4)
        # ... which is not what the hinted prompt gives
        assert not torch.allclose(torch.tensor(r["loss_logprobs"]), torch.tensor(r["behaviour_logprobs"]), atol=1e-3)


def test_wrong_hinted_samples_are_not_kept_and_solved_problems_get_no_hint(tmp_path, random_checkpoint, monkeypatch):
    config = _config(random_checkpoint, tmp_path)
    out = _stage(config, tmp_path / "a", monkeypatch, hinted_correct=False)[2]
    assert out.read("hints").num_rows == 0 and out.summary["unlocked_problems"] == 0 and out.summary["sampled"] > 0

    cur = curate.STAGE.run(config, Store(tmp_path / "b"))[0]
    solved = {cur.read("problems").column("problem_id").to_pylist()[0]}
    out = _stage(config, tmp_path / "b", monkeypatch, plain_correct_ids=solved)[2]
    hinted = {r["problem_id"] for r in out.read("hints").to_pylist()}
    assert hinted and not hinted & solved
    assert out.summary["stuck_problems"] == cur.read("problems").num_rows - 1


def test_hint_template_override_from_config_is_used(tmp_path, random_checkpoint, monkeypatch):
    tmpl = tmp_path / "my_hint.txt"
    tmpl.write_text("$question\nPSST ($hint) keep it to yourself\n")
    config = _config(random_checkpoint, tmp_path, prompts={"plain": "tiny_plain", "hint": str(tmpl)})
    rows = _stage(config, tmp_path / "ws", monkeypatch)[2].read("hints").to_pylist()
    assert rows and all(f"PSST ({r['guidance']}) keep it to yourself" in r["prompt"] and "PSST" not in r["loss_prompt"] for r in rows)


def test_leak_check_rejects_samples_that_mention_the_hint(tmp_path, random_checkpoint, monkeypatch):
    config = _config(random_checkpoint, tmp_path, hint={"leak_check": True})
    monkeypatch.setattr(hint, "mentions_hint", lambda completion, h: True)
    out = _stage(config, tmp_path / "ws", monkeypatch)[2]
    assert out.read("hints").num_rows == 0 and out.summary["leaks_rejected"] == out.summary["sampled"] > 0


def test_mentions_hint():
    assert hint.mentions_hint("as the HINT says, 12", "These answers are wrong: 5.")
    assert hint.mentions_hint("These answers are wrong: 5. so 7", "These answers are wrong: 5.")
    assert not hint.mentions_hint("12 + 7 = 19\n\\boxed{19}", "These answers are wrong: 5.")
