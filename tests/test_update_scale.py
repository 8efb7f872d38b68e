"""The update at real size, checked on CPU: micro-batches with gradient accumulation, gradient
checkpointing and the fused optimizer give the step of the whole batch; LoRA trains adapters only,
saves them beside the merged checkpoint, and serves as its own KL reference with adapters off."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tasks.stages.grpo import GRPOTrainConfig, Totals, adapters_off, completion_logps, make_batch, train_update, with_lora


def _rows(tok):
    """Plain, guided and explanation rows of different lengths, with per-token advantages on one."""
    texts = ["12 + 7 = 19", "19 - 3 = 16\n16", "12 + 7 = 20", "7", "12 + 7 = 19\n19 - 3 = 16", "3 + 3 = 6", "1", "12 - 2 = 10"]
    rows = []
    for i, text in enumerate(texts):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        kind = "explain" if i in (3, 6) else "plain"
        rows.append({"sample_id": f"s{i}", "group_id": "g", "loss_prompt": f"<|user|>q{i % 3} =<|end|><|assistant|>",
                     "completion_token_ids": ids, "reward": float(i % 2), "advantage": None if kind == "explain" else (0.8 if i % 2 else -0.6),
                     "token_advantages": [0.1 * (t % 4) for t in range(len(ids))] if i == 4 else None,
                     "behaviour_logprobs": [-1.0 - 0.1 * (t % 3) for t in range(len(ids))], "loss_logprobs": None,
                     "temperature": 0.9 if i % 3 else 1.0, "is_guided": i == 5, "prompt_kind": kind})
    return rows


@pytest.fixture(scope="module")
def policy(random_checkpoint):
    return AutoModelForCausalLM.from_pretrained(random_checkpoint), AutoTokenizer.from_pretrained(random_checkpoint)


def _step(policy, **cfg):
    base, tok = policy
    model = copy.deepcopy(base)
    cfg = {"learning_rate": 0.05, "optimizer": "sgd", "batch_size": 8, "max_grad_norm": None, "expo_beta": 0.3, **cfg}
    out = train_update(model, tok, _rows(tok), GRPOTrainConfig(**cfg))
    return model, out


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_and_checkpointing_give_the_step_of_the_whole_batch(policy, loss_agg):
    whole, w = _step(policy, loss_agg=loss_agg)
    moved = max((a - b).abs().max().item() for a, b in zip(whole.parameters(), policy[0].parameters()))
    assert moved > 1e-4  # the step did something
    for kw in ({"micro_batch_size": 3}, {"micro_batch_size": 1, "gradient_checkpointing": True}):
        model, out = _step(policy, loss_agg=loss_agg, **kw)
        assert out["first_loss"] == pytest.approx(w["first_loss"], abs=1e-5), kw
        for a, b in zip(model.parameters(), whole.parameters()):
            torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-4)
        assert not model.is_activation_checkpointing


def test_micro_batches_by_tokens_keep_the_step_and_the_budget(policy):
    from tasks.stages.grpo import batch_tokens, micro_batches

    _, tok = policy
    rows = _rows(tok)
    whole, w = _step(policy)
    budget = batch_tokens(rows[:3], tok)  # about three rows a pass, fewer where they are long
    cfg = GRPOTrainConfig(micro_batch_tokens=budget, micro_batch_size=4)
    parts = micro_batches(rows, tok, cfg)
    assert [r for part in parts for r in part] == rows and len(parts) >= 3  # in order, every row once
    assert all(len(part) <= 4 and (len(part) == 1 or batch_tokens(part, tok) <= budget) for part in parts)
    model, out = _step(policy, micro_batch_tokens=budget, micro_batch_size=4)
    assert out["first_loss"] == pytest.approx(w["first_loss"], abs=1e-5)
    for a, b in zip(model.parameters(), whole.parameters()):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-4)


def test_out_of_memory_in_a_forward_pass_splits_the_micro_batch_and_keeps_the_step(policy, monkeypatch, caplog):
    import tasks.stages._grpo_loop as grpo

    whole, w = _step(policy, old_logprobs="sampler")  # (π_old recomputed: the same step, tested in tests/test_old_logprobs.py)
    real, sizes = grpo.completion_logps, []

    def small_device(model, batch, **kw):  # a device that holds at most 3 rows' activations
        sizes.append(batch.input_ids.shape[0])
        if batch.input_ids.shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        return real(model, batch, **kw)

    monkeypatch.setattr(grpo, "completion_logps", small_device)
    model, out = _step(policy, old_logprobs="sampler")
    assert sizes[:3] == [8, 4, 2] and sum(s for s in sizes if s <= 3) == 8  # 8 -> 4 + 4 -> 2 + 2 + 4 -> ...
    assert "out of device memory in the forward pass of 8 rows" in caplog.text
    assert out["first_loss"] == pytest.approx(w["first_loss"], abs=1e-5)
    for a, b in zip(model.parameters(), whole.parameters()):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-4)
    monkeypatch.setattr(grpo, "completion_logps", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("one row")))
    with pytest.raises(torch.OutOfMemoryError, match="forward pass of 1 rows; lower train.grpo.micro_batch_size"):
        _step(policy, micro_batch_size=1, old_logprobs="sampler")  # one row that does not fit is an error that says what to change


def test_totals_of_rows_are_the_masks_counts(policy):
    """The normalisers counted from the rows equal those a whole batch's masks give."""
    _, tok = policy
    rows = _rows(tok)
    batch = make_batch(rows, tok)
    kind = batch.kind[:, None]
    samples = batch.completion_mask * ((kind == 0) | (kind == 1)).float()
    assert Totals.of_rows(rows) == Totals.of_mask(samples, batch.completion_mask * (kind == 2).float())


def test_fused_adamw_takes_the_step_of_adamw(policy):
    plain, _ = _step(policy, optimizer="adamw")
    try:
        fused, _ = _step(policy, optimizer="adamw_fused")
    except RuntimeError as exc:  # a torch build without the fused CPU kernel
        pytest.skip(f"fused AdamW not available on this CPU build: {exc}")
    for a, b in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_eight_bit_adamw_without_bitsandbytes_is_a_clear_error(policy):
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    with pytest.raises(ValueError, match="adamw_8bit needs bitsandbytes"):
        _step(policy, optimizer="adamw_8bit")


def test_lora_trains_adapters_only_and_is_its_own_reference(policy, tmp_path):
    base, tok = policy
    model = with_lora(copy.deepcopy(base), GRPOTrainConfig(lora=True, lora_r=4, lora_alpha=8))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert 0 < trainable < 0.5 * total
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    rows = _rows(tok)
    batch = make_batch(rows, tok)
    with torch.no_grad():
        torch.testing.assert_close(adapters_off(model)(batch), completion_logps(base, batch))  # before training: the same
    cfg = GRPOTrainConfig(learning_rate=0.05, optimizer="adamw", batch_size=8, lora=True, lora_r=4, lora_alpha=8, kl=0.1)
    out = train_update(model, tok, rows, cfg, adapters_off(model))
    assert out["steps"] == 1
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)  # the base weights did not move
    with torch.no_grad():
        torch.testing.assert_close(adapters_off(model)(batch), completion_logps(base, batch))  # the reference stays the base
        assert not torch.allclose(completion_logps(model, batch), completion_logps(base, batch))  # the adapters did learn
    model.save_pretrained(tmp_path / "adapter")
    merged = model.merge_and_unload()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    with torch.no_grad():
        assert not torch.allclose(completion_logps(merged, batch), completion_logps(base, batch))


def test_lora_with_checkpointing_and_micro_batches_takes_the_same_step(policy):
    base, tok = policy
    steps = []
    for kw in ({}, {"gradient_checkpointing": True, "micro_batch_size": 2}):
        cfg = GRPOTrainConfig(learning_rate=0.05, optimizer="sgd", batch_size=8, max_grad_norm=None, lora=True, lora_r=4, lora_alpha=8, **kw)
        torch.manual_seed(0)  # the same adapter initialisation
        model = with_lora(copy.deepcopy(base), cfg)
        train_update(model, tok, _rows(tok), cfg)
        steps.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert steps[0].keys() == steps[1].keys()
    for name, value in steps[0].items():
        torch.testing.assert_close(steps[1][name], value, atol=2e-6, rtol=1e-4)
    assert any(("lora_B" in n and v.abs().max() > 0) for n, v in steps[1].items())  # the adapters moved
