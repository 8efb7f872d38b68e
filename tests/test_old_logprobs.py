"""π_old as verl computes it (train.grpo.old_logprobs: recompute) and the training–inference mismatch
corrections (rollout_correction: token-truncate | token-mask), against hand-computed numbers."""

import copy
import math

import pytest
import torch

from tasks.stages._grpo_loop import mismatch_summary, recompute_old
from tasks.stages._grpo_losses import Totals, mismatch, rollout_weights
from tasks.stages.grpo import GRPOTrainConfig, make_batch, train_update, update_loss


def test_truncated_and_masked_weights_by_hand():
    old = torch.tensor([[math.log(0.5), math.log(0.9), math.log(0.1)]])
    sampler = torch.tensor([[math.log(0.1), math.log(0.9), math.log(0.5)]])  # ratios 5, 1, 0.2
    known = torch.tensor([[1.0, 1.0, 1.0]])
    w, keep = rollout_weights(old, sampler, known, "token-truncate", 2.0)
    assert w[0].tolist() == pytest.approx([2.0, 1.0, 0.2]) and keep.tolist() == [[1.0, 1.0, 1.0]]  # min(ratio, C)
    w, keep = rollout_weights(old, sampler, known, "token-mask", 2.0)
    assert w.tolist() == [[1.0, 1.0, 1.0]] and keep.tolist() == [[0.0, 1.0, 0.0]]  # outside [1/2, 2]: left out
    w, keep = rollout_weights(old, sampler, torch.tensor([[0.0, 1.0, 0.0]]), "token-truncate", 2.0)
    assert w[0].tolist() == pytest.approx([1.0, 1.0, 1.0])  # an unknown sampler log-prob: weight 1
    m = mismatch(old, sampler, known, 2.0, "token-truncate")
    assert m["tokens"] == 3 and m["abs_sum"] == pytest.approx(2 * math.log(5)) and m["abs_max"] == pytest.approx(math.log(5))
    assert m["capped"] == 1 and mismatch(old, sampler, known, 2.0, "token-mask")["capped"] == 2
    s = mismatch_summary(m)
    assert s["mean_abs_logp_diff"] == pytest.approx(2 * math.log(5) / 3, abs=1e-6) and s["capped_share"] == pytest.approx(1 / 3, abs=1e-6)


@pytest.fixture(scope="module")
def policy(random_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(random_checkpoint).eval(), AutoTokenizer.from_pretrained(random_checkpoint)


def _rows(tok, behaviour):
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in ("19", "17 ok", "3")]
    return [{"sample_id": f"s{i}", "loss_prompt": "12 + 7 =", "completion_token_ids": c, "advantage": a, "token_advantages": None,
             "behaviour_logprobs": behaviour(i, c), "temperature": 0.7, "is_guided": False, "prompt_kind": "plain"}
            for i, (c, a) in enumerate(zip(ids, (1.0, -0.5, 0.25)))]


def test_the_update_step_with_truncated_importance_weights_by_hand(policy):
    """One token-mean step's loss with recomputed π_old and token-truncate: before the first step r = 1, so each
    token's loss is −min(π_old/π_sampler, C)·A, averaged over the tokens (the sampler is off by a known factor)."""
    model, tok = policy
    shift = [math.log(4.0), -math.log(1.5), 0.0]  # sampler log-probs below/above the trainer's: ratios 4, 1/1.5, 1
    cfg = GRPOTrainConfig(rollout_correction="token-truncate", rollout_is_threshold=2.0, old_logprobs="recompute")
    rows = _rows(tok, lambda i, c: None)
    recompute_old(model, tok, rows, cfg, "cpu", "float32")
    for i, r in enumerate(rows):
        r["behaviour_logprobs"] = [float(x) - shift[i] for x in r["old_logprobs"]]
    batch = make_batch(rows, tok, needs_behaviour=False)
    loss = update_loss(model, batch, cfg)
    weights = [min(math.exp(s), 2.0) for s in shift]  # 2 (truncated from 4), 1/1.5, 1
    want = -sum(w * r["advantage"] * len(r["completion_token_ids"]) for w, r in zip(weights, rows)) / sum(len(r["completion_token_ids"]) for r in rows)
    assert float(loss) == pytest.approx(want, abs=1e-5)
    # token-mask: the first row's tokens (ratio 4 > 2) are out of the loss and of its denominator
    cfg = cfg.model_copy(update={"rollout_correction": "token-mask"})
    masked = [dict(r) for r in rows]
    for r in masked:
        r.pop("old_logprobs")
    stats = {}
    recompute_old(model, tok, masked, cfg, "cpu", "float32", stats)
    assert [r["masked_tokens"] for r in masked] == [len(masked[0]["completion_token_ids"]), 0, 0]
    totals = Totals.of_rows(masked, needs_behaviour=False)
    loss = update_loss(model, make_batch(masked, tok, needs_behaviour=False), cfg, totals=totals)
    kept = rows[1:]
    want = -sum(r["advantage"] * len(r["completion_token_ids"]) for r in kept) / sum(len(r["completion_token_ids"]) for r in kept)
    assert float(loss) == pytest.approx(want, abs=1e-5)
    assert stats["capped"] == len(rows[0]["completion_token_ids"]) and stats["abs_max"] == pytest.approx(math.log(4.0), abs=1e-5)


def test_recomputed_old_logprobs_equal_the_in_process_samplers(policy):
    """The in-process backend's sampler log-probs (log_softmax of the processed logits it sampled from) and the
    trainer's recomputed π_old agree within 1e-5 at the sampling temperature: the mismatch on this backend is 0."""
    from tasks.models.generation import SamplingParams
    from tasks.models.transformers_backend import TransformersBackend

    model, tok = policy
    backend = TransformersBackend.from_objects(model, tok, "p", batch_size=8)
    prompts = ["12 + 7 =", "3 + 4 = ?", "9 + 9"]
    params = SamplingParams(n=3, temperature=0.8, max_new_tokens=12, seed=3)
    samples = backend.generate(prompts, params)
    rows = [{"sample_id": f"{i}-{j}", "loss_prompt": p, "completion_token_ids": s.token_ids, "advantage": 1.0, "token_advantages": None,
             "behaviour_logprobs": s.logprobs, "temperature": 0.8, "is_guided": False, "prompt_kind": "plain"}
            for i, (p, group) in enumerate(zip(prompts, samples)) for j, s in enumerate(group)]
    stats = {}
    recompute_old(model, tok, rows, GRPOTrainConfig(micro_batch_size=4), "cpu", "float32", stats)
    for r in rows:
        assert r["old_logprobs"].tolist() == pytest.approx(list(r["behaviour_logprobs"]), abs=1e-5)
    assert mismatch_summary(stats)["max_abs_logp_diff"] < 1e-5


def test_recompute_trains_rows_the_sampler_gave_no_logprobs_for(policy):
    """A text-only server's rows (no behaviour log-probs): masked under `sampler`, trained under `recompute`,
    where the first step equals the step with the exact sampler numbers (π_old is the same policy)."""
    model, tok = policy
    exact = _rows(tok, lambda i, c: None)
    recompute_old(model, tok, exact, GRPOTrainConfig(), "cpu", "float32")
    for r in exact:
        r["behaviour_logprobs"] = list(r.pop("old_logprobs"))
    text_only = _rows(tok, lambda i, c: None)
    cfg = dict(learning_rate=0.05, optimizer="sgd", batch_size=3, max_grad_norm=None)
    out = train_update(copy.deepcopy(model), tok, text_only, GRPOTrainConfig(old_logprobs="sampler", **cfg))
    assert out["steps"] == 0  # nothing to train on without the sampler's numbers
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    got = train_update(a, tok, text_only, GRPOTrainConfig(old_logprobs="recompute", **cfg))
    want = train_update(b, tok, exact, GRPOTrainConfig(old_logprobs="sampler", **cfg))
    assert got["steps"] == want["steps"] == 1 and got["first_loss"] == pytest.approx(want["first_loss"], abs=1e-6)
    assert got["mismatch"]["tokens"] == 0  # no sampler numbers to compare with
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert "old_logprobs" not in text_only[0]  # the caller's rows are not written to
