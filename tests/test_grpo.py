"""The policy update: loss pieces against hand-computed values, the LTE one-step
test, and one SGD step against TRL's GRPOTrainer on the same on-policy group."""

import copy
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tasks.models.prompts import chat, fill, load_template
from tasks.registry import parse_config
from tasks.stages.grpo import LOSS_AGG, GRPOTrainConfig, clipped_surrogate, completion_logps, expo_beta_at, kl_k3, make_batch, nll, shaped_surrogate, train_update, update_loss
from tasks.stages.materialize import build

TINY = Path(__file__).resolve().parents[1] / "data" / "models" / "tiny-policy"


def test_loss_pieces_match_hand_computed_values():
    t = torch.tensor
    # r = 1.5 > 1 + 0.28 with A > 0: clipped to 1.28; with A < 0 the unclipped (larger) loss wins
    assert clipped_surrogate(t([math.log(1.5)]), t([0.0]), t([1.0]), 0.2, 0.28).item() == pytest.approx(-1.28)
    assert clipped_surrogate(t([math.log(1.5)]), t([0.0]), t([-1.0]), 0.2, 0.28).item() == pytest.approx(1.5)
    assert clipped_surrogate(t([math.log(0.5)]), t([0.0]), t([1.0]), 0.2, 0.28).item() == pytest.approx(-0.5)
    # LTE shaping: f(1) = 1/1.1, and d f / d logp = gamma r / (r + gamma)^2, unclipped at large r
    logp = t([0.0], requires_grad=True)
    loss = shaped_surrogate(logp, t([0.0]), t([1.0]), 0.1)
    loss.backward()
    assert loss.item() == pytest.approx(-1 / 1.1) and logp.grad.item() == pytest.approx(-0.1 / 1.21)
    assert shaped_surrogate(t([math.log(50.0)]), t([0.0]), t([1.0]), 0.1).item() == pytest.approx(-50 / 50.1)
    assert nll(t([-2.0]), 0.04).item() == pytest.approx(0.08)
    assert kl_k3(t([0.0]), t([0.0])).item() == 0.0
    assert kl_k3(t([0.0]), t([math.log(0.5)])).item() == pytest.approx(0.5 - math.log(0.5) - 1)


def test_loss_aggregations_match_verls_formulas_by_hand():
    t = torch.tensor
    loss, mask = t([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]]), t([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # token-mean: (1 + 2 + 4) / 3 tokens; the empty third row takes no part
    assert LOSS_AGG["token-mean"](loss, mask).item() == pytest.approx(7 / 3)
    # seq-mean-token-mean: ((1 + 2) / 2 + 4 / 1) / 2 sequences
    assert LOSS_AGG["seq-mean-token-mean"](loss, mask).item() == pytest.approx(2.75)
    # seq-mean-token-sum-norm: ((1 + 2) / L + 4 / L) / 2, L the padded width (3) or the constant given (Dr. GRPO)
    assert LOSS_AGG["seq-mean-token-sum-norm"](loss, mask).item() == pytest.approx((3 / 3 + 4 / 3) / 2)
    assert LOSS_AGG["seq-mean-token-sum-norm"](loss, mask, 10).item() == pytest.approx((3 / 10 + 4 / 10) / 2)
    assert GRPOTrainConfig().loss_agg == "token-mean"  # verl's default


def test_expo_beta_schedule():
    constant, linear = GRPOTrainConfig(expo_beta=0.04), GRPOTrainConfig(expo_beta=0.04, expo_beta_schedule="linear")
    assert [expo_beta_at(constant, s, 5) for s in range(5)] == [0.04] * 5
    assert [expo_beta_at(linear, s, 5) for s in range(5)] == pytest.approx([0.04, 0.03, 0.02, 0.01, 0.0])


@pytest.fixture(scope="module")
def tiny():
    return AutoModelForCausalLM.from_pretrained(str(TINY)).eval(), AutoTokenizer.from_pretrained(str(TINY))


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_one_step_on_a_group_whose_only_correct_sample_is_hinted_raises_it_under_the_plain_prompt(tiny, tmp_path):
    """One update per group; six groups of the policy's own (wrong) samples. The hinted
    sample rises on most and on average. It can fall on a group whose failures share
    its uncertain tokens: their negative advantages push those down, and the shaped
    term weighs a guided token at most 1/4 of a plain one (f'(r) r <= 1/4)."""
    from tasks.models.generation import SamplingParams
    from tasks.models.transformers_backend import TransformersBackend

    base, tok = tiny
    backend = TransformersBackend(str(TINY))
    q = "State the final answer to the following arithmetic problem: 47 + 38 ="
    plain = chat(tok, fill(load_template("tiny_plain"), q))
    hinted = chat(tok, fill(load_template("tiny_hint"), q, hint="These answers are wrong: 84."))
    right = "47 + 38 = 85\n\\boxed{85}"
    ids = _ids(tok, right)
    # a correct sample under the hint: behaviour log-probs under the hinted prompt, loss side under the plain one
    hints = [{"sample_id": "hint0", "problem_id": "p", "sample_idx": 0, "prompt": hinted, "completion": right,
              "completion_token_ids": ids, "behaviour_logprobs": backend.score([hinted], [ids])[0], "finish_reason": "stop", "temperature": 1.0,
              "correct": True, "prompt_kind": "hint", "loss_prompt": plain, "loss_logprobs": backend.score([plain], [ids])[0]}]
    assert sum(hints[0]["behaviour_logprobs"]) < sum(hints[0]["loss_logprobs"]) - 1  # the two prompts really differ
    config = parse_config({"problems": {"sources": [{"file": "x.jsonl"}]}}, base_dir=tmp_path)
    changes = []
    for seed in range(6):
        samples = backend.generate([plain], SamplingParams(n=8, temperature=1.0, max_new_tokens=40, seed=seed))[0]
        rollouts = [{"sample_id": f"plain{i}", "problem_id": "p", "sample_idx": i, "prompt": plain, "completion": s.text,
                     "completion_token_ids": s.token_ids, "behaviour_logprobs": s.logprobs, "finish_reason": "stop", "temperature": 1.0,
                     "correct": s.text.strip().endswith("{85}"), "prompt_kind": "plain", "loss_prompt": plain, "loss_logprobs": None}
                    for i, s in enumerate(samples)]
        assert not any(r["correct"] for r in rollouts)  # the policy cannot do this level: a stuck group
        data, counts = build(config, rollouts, [], hints, grades={})
        assert counts["lte_replaced_samples"] == 1 and sum(r["is_guided"] for r in data["grpo"]) == 1
        model = copy.deepcopy(base)
        probe = make_batch([r for r in data["grpo"] if r["is_guided"]], tok)
        with torch.no_grad():
            before = completion_logps(model, probe).sum().item()
        assert before == pytest.approx(sum(hints[0]["loss_logprobs"]), abs=1e-3)  # measured under the plain prompt
        train_update(model, tok, data["grpo"], GRPOTrainConfig(learning_rate=1e-3, optimizer="sgd", batch_size=16, max_grad_norm=None))
        with torch.no_grad():
            changes.append(completion_logps(model, probe).sum().item() - before)
    assert sum(c > 0 for c in changes) >= 4 and sum(changes) / len(changes) > 0.2, changes


@pytest.mark.parametrize("loss_agg,trl_loss_type,temperature", [
    ("seq-mean-token-mean", "grpo", 1.0), ("token-mean", "bnpo", 1.0), ("seq-mean-token-sum-norm", "dr_grpo", 1.0),
    ("token-mean", "bnpo", 0.7)])
def test_one_sgd_step_matches_trls_grpo_trainer_on_an_on_policy_group(tiny, tmp_path, loss_agg, trl_loss_type, temperature):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    base, tok = tiny
    G, lr = 4, 0.5
    prompt = chat(tok, fill(load_template("tiny_plain"), "State the final answer to the following arithmetic problem: 23 + 45 ="))
    completions = [_ids(tok, t) + [tok.eos_token_id] for t in  # one of another length: padding and masks matter
                   ("23 + 45 = 68\n\\boxed{68}", "23 + 45 = 67\n\\boxed{67}", "23 + 45 = 78\n\\boxed{78}", "23 + 45 = 68\n\\boxed{68} ")]
    rewards = [1.0, 0.0, 0.0, 1.0]
    by_ids = {tuple(c): r for c, r in zip(completions, rewards)}

    # ours: rows of a materialised group (advantage r - mean, as TRL's scale_rewards="none"), behaviour = current policy
    ours = copy.deepcopy(base)
    rows = [{"loss_prompt": prompt, "completion_token_ids": c, "prompt_kind": "plain", "is_guided": False, "temperature": temperature,
             "advantage": r - sum(rewards) / G, "token_advantages": None, "behaviour_logprobs": None} for c, r in zip(completions, rewards)]
    with torch.no_grad():
        beh = completion_logps(ours, make_batch(rows, tok))
    for i, r in enumerate(rows):
        r["behaviour_logprobs"] = beh[i, : len(r["completion_token_ids"])].tolist()
    cfg = GRPOTrainConfig(learning_rate=lr, optimizer="sgd", batch_size=G, max_grad_norm=None, kl=0.0, loss_agg=loss_agg,
                          loss_scale_factor=32)  # Dr. GRPO's constant: TRL divides by max_completion_length
    batch = make_batch(rows, tok)
    ours.train()
    loss = update_loss(ours, batch, cfg)
    loss.backward()
    with torch.no_grad():
        for p in ours.parameters():
            p -= lr * p.grad

    # TRL: one GRPOTrainer step, plain SGD, beta 0, the same completions through rollout_func
    theirs = copy.deepcopy(base)

    def rollout_func(prompts, trainer):
        return {"prompt_ids": [_ids(tok, p) for p in prompts], "completion_ids": [completions[i % G] for i in range(len(prompts))],
                "logprobs": [[0.0] * len(completions[i % G]) for i in range(len(prompts))]}

    def reward(prompts, completions, completion_ids, **kw):
        return [by_ids[tuple(ids)] for ids in completion_ids]

    args = GRPOConfig(output_dir=str(tmp_path / "trl"), learning_rate=lr, optim="sgd", max_steps=1, per_device_train_batch_size=G,
                      num_generations=G, gradient_accumulation_steps=1, beta=0.0, loss_type=trl_loss_type, scale_rewards="none",
                      max_grad_norm=1e9, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, report_to=[],
                      save_strategy="no", logging_steps=1, use_cpu=True, temperature=temperature, max_completion_length=32,
                      seed=0, num_iterations=1, epsilon=0.2, epsilon_high=0.28, disable_tqdm=True, bf16=False, fp16=False)
    trainer = GRPOTrainer(model=theirs, reward_funcs=reward, args=args, train_dataset=Dataset.from_dict({"prompt": [prompt] * 4}),
                          processing_class=tok, rollout_func=rollout_func)
    trainer.train()

    d_ours = torch.cat([(p - q).flatten() for p, q in zip(ours.parameters(), base.parameters())])
    d_trl = torch.cat([(p.detach() - q).flatten() for p, q in zip(trainer.model.parameters(), base.parameters())])
    assert d_ours.abs().max() > 1e-4  # the step did something
    # the same parameter change, to float32 rounding: within 1e-4 of its largest element. (TRL must run in
    # float32: on CPU the Trainer otherwise autocasts to bf16, which alone moves the change by ~1%.)
    err = (d_ours - d_trl).abs().max().item() / d_ours.abs().max().item()
    assert err <= 1e-4, err


def test_before_the_first_step_every_tokens_ratio_is_one_at_the_sampling_temperature(tiny):
    """Rows sampled at T = 0.8: the update scores their tokens at 0.8 (logits / T), so π_θ / π_behaviour is 1
    for plain rows and π_θ(· | plain prompt) equals the loss-side log-probs of guided rows, token by token."""
    from tasks.models.generation import SamplingParams
    from tasks.models.transformers_backend import TransformersBackend
    from tasks.stages.rollouts import sample_rows

    model, tok = tiny
    backend = TransformersBackend(str(TINY))
    T = 0.8
    q = {"problem_id": "p", "question": "State the final answer to the following arithmetic problem: 47 + 38 =", "answer": "85"}
    plain = chat(tok, fill(load_template("tiny_plain"), q["question"]))
    hinted = chat(tok, fill(load_template("tiny_hint"), q["question"], hint="These answers are wrong: 84."))
    params = SamplingParams(n=4, temperature=T, max_new_tokens=24, seed=3)
    rows = sample_rows([q], backend.generate([plain], params), [plain], "pol", T)
    guided = sample_rows([q], backend.generate([hinted], params), [hinted], "pol", T, prompt_kind="hint",
                         guidance=["These answers are wrong: 84."], loss_prompts=[plain])
    for g, lp in zip(guided, backend.score([plain] * len(guided), [g["completion_token_ids"] for g in guided], T)):
        g["loss_logprobs"] = lp
    for r in rows + guided:
        r.update(advantage=1.0, token_advantages=None, is_guided=r["prompt_kind"] == "hint")
    batch = make_batch(rows + guided, tok)
    assert batch.temperature.tolist() == pytest.approx([T] * len(rows + guided))
    with torch.no_grad():
        logp = completion_logps(model, batch)
    for i, r in enumerate(rows + guided):
        n = len(r["completion_token_ids"])
        expected = r["behaviour_logprobs"] if r["prompt_kind"] == "plain" else r["loss_logprobs"]
        ratio = torch.exp(logp[i, :n] - torch.tensor(expected))
        assert torch.allclose(ratio, torch.ones(n), atol=1e-5), (r["prompt_kind"], (ratio - 1).abs().max().item())
    # scored at temperature 1 instead (the old update), the same tokens are off by far more
    batch.temperature.fill_(1.0)
    with torch.no_grad():
        at_one = completion_logps(model, batch)
    assert (at_one[0, : len(rows[0]["completion_token_ids"])] - torch.tensor(rows[0]["behaviour_logprobs"])).abs().max() > 1e-2


def _expo_grad(model, tok, rows, beta=0.04):
    m = copy.deepcopy(model)
    m.zero_grad()
    update_loss(m, make_batch(rows, tok), GRPOTrainConfig(expo_beta=beta)).backward()
    return torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])


def test_expo_term_weight_does_not_depend_on_the_group_size(tiny):
    """β · log π(explanation | question) per question: the explanation rows' gradient is the same whether 4 or
    8 sample rows (here with zero advantage: no gradient of their own) share the batch."""
    model, tok = tiny
    prompt = chat(tok, fill(load_template("tiny_plain"), "State the final answer to the following arithmetic problem: 23 + 45 ="))
    expl = [{"loss_prompt": prompt, "completion_token_ids": _ids(tok, "23 + 45 = 68\n\\boxed{68}"), "prompt_kind": "explain",
             "is_guided": True, "advantage": None, "token_advantages": None, "behaviour_logprobs": None, "temperature": 1.0}]
    ids = _ids(tok, "23 + 45 = 67\n\\boxed{67}")
    with torch.no_grad():
        beh = completion_logps(model, make_batch([{**expl[0], "completion_token_ids": ids, "prompt_kind": "plain"}], tok))[0].tolist()

    def group(n):
        return [{"loss_prompt": prompt, "completion_token_ids": ids, "prompt_kind": "plain", "is_guided": False, "advantage": 0.0,
                 "token_advantages": None, "behaviour_logprobs": beh, "temperature": 1.0} for _ in range(n)]

    g4, g8 = _expo_grad(model, tok, expl + group(4)), _expo_grad(model, tok, expl + group(8))
    assert g4.abs().max() > 0 and torch.allclose(g4, g8, atol=1e-7)
    # and it is β times the explanation's mean token NLL gradient, as the explanation alone gives it
    assert torch.allclose(g4, _expo_grad(model, tok, expl), atol=1e-7)
    assert torch.allclose(_expo_grad(model, tok, expl, beta=0.08), 2 * g4, atol=1e-7)


def test_entropy_bonus_lowers_the_loss_by_its_weight_times_the_token_mean_entropy(tiny):
    model, tok = tiny
    prompt = chat(tok, fill(load_template("tiny_plain"), "State the final answer to the following arithmetic problem: 23 + 45 ="))
    rows = [{"loss_prompt": prompt, "completion_token_ids": _ids(tok, t), "prompt_kind": "plain", "is_guided": False,
             "advantage": a, "token_advantages": None, "behaviour_logprobs": None, "temperature": 1.0}
            for t, a in (("23 + 45 = 68", 1.0), ("23 + 45 = 6", -1.0))]
    batch = make_batch(rows, tok)
    with torch.no_grad():
        logp, entropy = completion_logps(model, batch, with_entropy=True)
        for i, r in enumerate(rows):
            r["behaviour_logprobs"] = logp[i, : len(r["completion_token_ids"])].tolist()
        batch = make_batch(rows, tok)
        # by hand: the entropy at one position from the raw logits
        pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        p = torch.softmax(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos).logits[0, batch.prompt_width - 1], -1)
        assert entropy[0, 0].item() == pytest.approx(-(p * p.log()).sum().item(), rel=1e-4)
        off = update_loss(model, batch, GRPOTrainConfig(expo_beta=0.0))
        on = update_loss(model, batch, GRPOTrainConfig(expo_beta=0.0, entropy=0.01))
    mask = batch.completion_mask
    assert (off - on).item() == pytest.approx(0.01 * ((entropy * mask).sum() / mask.sum()).item(), rel=1e-4)


def test_the_update_refuses_rollouts_sampled_with_top_p_below_one(tmp_path):
    """Behaviour log-probs of a top-p-truncated distribution cannot be matched by the update's full softmax."""
    from tasks.core.schemas import to_table
    from tasks.core.store import Store
    from tasks.stages import grpo

    store = Store(tmp_path / "ws")
    mat = store.write("materialize", "k", {"grpo": ("grpo", to_table([], "grpo"))}, config={}, inputs={}, stage_version="t")
    config = parse_config({"problems": {"sources": [{"file": "x.jsonl"}]}, "policy": {"model": str(TINY)},
                           "rollouts": {"top_p": 0.9}}, base_dir=tmp_path)
    with pytest.raises(ValueError, match="rollouts.top_p is 0.9"):
        grpo.STAGE.run(config, store, {"materialize": mat})
    assert not store.outputs("grpo")


def _grpo_files(tmp_path, n=50, parts=3):
    """A grpo dataset written in ``parts`` Parquet files: plain, guided, explanation and masked rows."""
    import pyarrow.parquet as pq

    from tasks.core.schemas import to_table

    def row(i):
        kind = "explain" if i % 7 == 0 else "plain"
        return {"sample_id": f"s{i:03d}", "group_id": f"g{i // 8}", "loss_prompt": "q", "completion_token_ids": [1 + i % 5, 2],
                "reward": 1.0, "advantage": None if (i % 11 == 3 or kind == "explain") else 0.5, "token_advantages": None,
                "behaviour_logprobs": [-0.1, -0.2], "loss_logprobs": None, "temperature": 1.0, "is_guided": i % 5 == 1,
                "prompt_kind": kind}

    rows = [row(i) for i in range(n)]
    files, cut = [], -(-n // parts)
    for p in range(parts):
        files.append(tmp_path / f"part-{p:05d}.parquet")
        pq.write_table(to_table(rows[p * cut:(p + 1) * cut], "grpo"), files[-1])
    return rows, files


def test_grpo_rows_stream_through_a_seeded_shuffle_buffer(tmp_path, monkeypatch):
    """The update reads its rows from the Parquet files (tasks/stages/grpo.py: GRPORows): a dataset that fits
    the buffer gives the minibatches of the in-memory rows exactly; a bigger one streams through the
    buffer — every trainable row once per epoch, masked rows never, seeded, not in file order, and
    never more than buffer + minibatch rows read ahead of the update."""
    import polars as pl

    from tasks.stages import grpo
    from tasks.stages.grpo import KINDS, GRPORows, kind_counts, minibatches, row_kind

    rows, files = _grpo_files(tmp_path)
    trainable = [r["sample_id"] for r in rows if row_kind(r) != KINDS["masked"]]
    assert 30 < len(trainable) < len(rows)
    ids = lambda batches: [[r["sample_id"] for r in b] for b in batches]  # noqa: E731

    steps, in_memory = minibatches(rows, 4, 2, seed=3)
    whole = GRPORows(files, shuffle_buffer=len(trainable))
    assert len(whole) == len(trainable)
    steps_whole, from_files = minibatches(whole, 4, 2, seed=3)
    assert steps_whole == steps == 2 * -(-len(trainable) // 4) and ids(from_files) == ids(in_memory)

    monkeypatch.setattr(grpo, "READ_ROWS", 3)
    read = {"n": 0}
    real_read = GRPORows.read

    def counting(self, order=None):
        for r in real_read(self, order):
            read["n"] += 1
            yield r

    monkeypatch.setattr(GRPORows, "read", counting)
    small = GRPORows(files, shuffle_buffer=8)
    steps_small, streamed = minibatches(small, 4, 2, seed=3)
    batches = []
    for b in streamed:
        if not batches:
            assert read["n"] <= 8 + 4 + 1  # the first minibatch came before the rest was read
        batches.append([r["sample_id"] for r in b])
    assert len(batches) == steps_small == steps
    flat = [s for b in batches for s in b]
    epoch1, epoch2 = flat[:len(trainable)], flat[len(trainable):]
    assert sorted(epoch1) == sorted(epoch2) == sorted(trainable) and epoch1 != trainable and epoch1 != epoch2
    assert ids(minibatches(GRPORows(files, 8), 4, 2, seed=3)[1]) == batches  # seeded
    assert ids(minibatches(GRPORows(files, 8), 4, 2, seed=4)[1]) != batches

    counts = kind_counts(pl.scan_parquet([str(f) for f in files]))
    assert counts == {k: sum(row_kind(r) == v for r in rows) for k, v in KINDS.items()}


def test_rows_read_from_files_make_the_batches_of_the_same_rows_in_memory(tiny, tmp_path):
    """GRPORows hands the update each row's per-token values as NumPy views of the record batch (not
    lists of Python numbers): make_batch builds the same tensors from them as from the rows as lists —
    completions of different lengths, token advantages, behaviour log-probs of the wrong length
    (unknown: 0), a masked row left out, an explanation row at temperature 1."""
    import pyarrow.parquet as pq

    from tasks.core.schemas import to_table
    from tasks.stages.grpo import GRPORows

    _, tok = tiny
    rows = []
    for i in range(9):
        n = 1 + i % 4
        rows.append({"sample_id": f"s{i}", "group_id": "g", "loss_prompt": "q" * (1 + i % 3), "completion_token_ids": list(range(3, 3 + n)),
                     "reward": 1.0, "advantage": None if i == 4 else 0.25 * i, "token_advantages": [0.1 * i] * n if i % 3 == 0 else None,
                     "behaviour_logprobs": [-0.3] * (n if i != 5 else n + 1), "loss_logprobs": None, "temperature": 0.7,
                     "is_guided": i % 2 == 1, "prompt_kind": "explain" if i == 8 else "plain"})
    pq.write_table(to_table(rows, "grpo"), tmp_path / "part-00000.parquet")
    read = list(GRPORows([tmp_path / "part-00000.parquet"], 16).read())
    assert [r["sample_id"] for r in read] == [r["sample_id"] for r in rows if r["sample_id"] != "s4"]
    assert type(read[0]["completion_token_ids"]).__module__ == "numpy"
    from_files = make_batch(read, tok)
    in_memory = make_batch([r for r in rows if r["sample_id"] != "s4"], tok)
    for field in ("input_ids", "attention_mask", "completion_mask", "behaviour", "advantages", "kind", "temperature"):
        assert torch.equal(getattr(from_files, field), getattr(in_memory, field)), field
    assert from_files.behaviour[4].abs().sum() == 0 and from_files.temperature[-1] == 1.0
    assert torch.allclose(from_files.advantages[0, :1], torch.tensor([0.0])) and from_files.advantages[2, 0] == 0.5


def test_expo_term_sequence_is_the_papers_sum_and_token_mean_its_per_token_mean():
    """Two explanations of 3 and 2 tokens, β = 0.04, by hand: sequence = β·(Σ NLL₁ + Σ NLL₂)/2; token-mean =
    β·(mean NLL₁ + mean NLL₂)/2. Cut into two micro-batches with the step's Totals, the parts add up to the whole."""
    import torch

    from tasks.stages._grpo_losses import Totals, expo_term

    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    beta = 0.04
    assert float(expo_term(logp, mask, beta, form="sequence")) == pytest.approx(beta * (6.0 + 2.0) / 2)
    assert float(expo_term(logp, mask, beta, form="token-mean")) == pytest.approx(beta * (2.0 + 1.0) / 2)
    totals = Totals(tokens=0.0, sequences=0.0, explanations=2.0, width=3)
    for form in ("sequence", "token-mean"):
        parts = sum(float(expo_term(logp[i : i + 1], mask[i : i + 1], beta, totals=totals, form=form)) for i in range(2))
        assert parts == pytest.approx(float(expo_term(logp, mask, beta, form=form)))
    from tasks.core.config import apply_preset

    raw, sources = apply_preset({}, "expo")
    assert raw["train"]["grpo"]["expo_nll"] == "sequence" and "train.grpo.expo_nll" in sources
