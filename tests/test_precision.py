"""Devices and precision (`policy.device`, `policy.dtype`): how they resolve, what they change, and that the
GPU code paths (bfloat16 weights for sampling, bfloat16 autocast for the update) run — here on CPU, where
only their speed is not measured."""

from __future__ import annotations

import copy

import pytest
import torch

from tasks.core.config import ConfigError
from tasks.models import policy
from tests.conftest import tiny_config


def _config(tmp_path, **p):
    return tiny_config(tmp_path, policy=p)


def test_device_and_dtype_resolve_by_what_torch_sees(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert policy.resolve_device("auto") == "cpu" and policy.resolve_dtype("auto", "cpu") == "float32"
    with pytest.raises(ConfigError, match="policy.device: cuda, but torch sees no CUDA device"):
        policy.resolve_device("cuda")
    assert policy.resolve_dtype("bfloat16", "cpu") == "bfloat16"  # asked for: CPU autocast / bf16 weights work, slowly

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert policy.resolve_device("auto") == "cuda" and policy.resolve_device("cuda:1") == "cuda:1"
    assert policy.resolve_dtype("auto", "cuda") == "bfloat16"
    with pytest.raises(ConfigError, match="policy.device: cuda:2, but torch sees 2 CUDA device"):
        policy.resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert policy.resolve_dtype("auto", "cuda") == "float32"  # a GPU without bf16 (e.g. V100): float32


def test_precision_enters_the_keys_only_when_it_is_not_float32(tmp_path, monkeypatch):
    """On CPU (float32) the stage keys are what they were; bfloat16 samples and updates are other outputs."""
    from tasks.stages import rollouts

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = _config(tmp_path)
    assert policy.precision(cpu) == ("cpu", "float32") and policy.precision_settings(cpu) == {}
    bf16 = _config(tmp_path, dtype="bfloat16")
    assert policy.precision_settings(bf16) == {"dtype": "bfloat16"}
    assert rollouts.settings(cpu) != rollouts.settings(bf16)
    with pytest.raises(Exception, match="policy.device"):
        _config(tmp_path, device="gpu0")  # not a device spec


def test_bfloat16_sampling_backend_loads_bf16_weights_and_generates(random_checkpoint):
    from tasks.models.generation import SamplingParams
    from tasks.models.transformers_backend import TransformersBackend

    backend = TransformersBackend(random_checkpoint, batch_size=4, device="cpu", dtype="bfloat16")
    assert next(backend.model.parameters()).dtype == torch.bfloat16
    [samples] = backend.generate(["<|user|>1 + 2 =<|end|><|assistant|>"], SamplingParams(n=2, max_new_tokens=4, seed=0))
    assert len(samples) == 2 and all(s.token_ids for s in samples)
    assert all(lp == lp for s in samples for lp in s.logprobs)  # finite


def test_the_update_under_bfloat16_autocast_runs_and_keeps_float32_weights(random_checkpoint):
    """train_update(dtype=bfloat16): forward passes under autocast (the losses differ from float32's),
    weights and optimizer state float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.stages.grpo import GRPOTrainConfig, train_update

    tok = AutoTokenizer.from_pretrained(random_checkpoint)
    base = AutoModelForCausalLM.from_pretrained(random_checkpoint)
    ids = tok("12 + 7 = 19", add_special_tokens=False)["input_ids"]
    rows = [{"sample_id": f"s{i}", "group_id": "g", "loss_prompt": "<|user|>12 + 7 =<|end|><|assistant|>",
             "completion_token_ids": ids, "reward": float(i % 2), "advantage": 1.0 if i % 2 else -1.0, "token_advantages": None,
             "behaviour_logprobs": [-1.0] * len(ids), "loss_logprobs": None, "temperature": 1.0, "is_guided": False,
             "prompt_kind": "plain"} for i in range(4)]
    cfg = GRPOTrainConfig(learning_rate=1e-3, batch_size=4, old_logprobs="sampler")  # (recomputed: ratio 1, loss 0 here)
    results = {}
    for dtype in ("float32", "bfloat16"):
        model = copy.deepcopy(base)
        results[dtype] = train_update(model, tok, rows, cfg, device="cpu", dtype=dtype)
        assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert results["bfloat16"]["steps"] == results["float32"]["steps"] == 1
    assert results["bfloat16"]["first_loss"] == pytest.approx(results["float32"]["first_loss"], abs=0.05)
    assert results["bfloat16"]["first_loss"] != results["float32"]["first_loss"]  # autocast really ran
