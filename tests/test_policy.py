import json
import string

from tasks.models.answers import steps_correct
from tasks.models.generation import SamplingParams, checkpoint_fingerprint
from tasks.models.transformers_backend import TransformersBackend
from tasks.models.prompts import chat, fill, hint_text, load_template
from tasks.models.tiny_policy import TinyPolicyConfig, build_tokenizer, solution_text, train_tiny_policy


def test_character_tokenizer_covers_printable_ascii_and_round_trips():
    tok = build_tokenizer()
    text = string.printable.replace("\r", "").replace("\x0b", "").replace("\x0c", "").replace("\t", "")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and len(ids) == len(text)
    assert tok.decode(ids) == text
    prompt = chat(tok, "1 + 2 =")
    assert prompt == "<|user|>1 + 2 =<|end|><|assistant|>"
    assert tok(prompt, add_special_tokens=False)["input_ids"][0] == tok.convert_tokens_to_ids("<|user|>")


def test_solution_and_hint_formats():
    assert solution_text("12 + 7 - 30") == "12 + 7 = 19\n19 - 30 = -11\n\\boxed{-11}"
    assert hint_text(["5", "7"], False) == "These answers are wrong: 5, 7."
    assert hint_text([], True) == "Be concise."
    assert hint_text(["5"], True) == "These answers are wrong: 5. Be concise."
    assert steps_correct("12 + 7 = 19\n19 - 30 = -11\n\\boxed{-11}")
    assert not steps_correct("12 + 7 = 18\n\\boxed{18}") and not steps_correct("\\boxed{19}")
    t = load_template("tiny_explain")
    assert fill(t, "Q?", answer="42") == "Q?\nAnswer: 42. Explain."


def test_bootstrap_trains_saves_and_reproduces(tmp_path):
    cfg = TinyPolicyConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, steps=4, batch_size=4)
    a = train_tiny_policy(cfg, tmp_path / "a")
    b = train_tiny_policy(cfg, tmp_path / "b")
    assert checkpoint_fingerprint(tmp_path / "a") == checkpoint_fingerprint(tmp_path / "b")  # same seed, same weights
    assert a["final_loss"] == b["final_loss"]
    train_tiny_policy(TinyPolicyConfig(**{**cfg.__dict__, "seed": 1}), tmp_path / "c")
    assert checkpoint_fingerprint(tmp_path / "c") != checkpoint_fingerprint(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "bootstrap.json").read_text())["config"]["steps"] == 4
    be = TransformersBackend(tmp_path / "a", batch_size=4)
    (samples,) = be.generate([chat(be.tokenizer, "1 + 2 =")], SamplingParams(n=2, max_new_tokens=5))
    assert len(samples) == 2 and all(len(s.token_ids) <= 5 for s in samples)


def test_bootstrap_report_counts_a_derivation_only_with_every_partial_sum():
    """The bootstrap's pass@k tables, against a scripted policy whose four samples per prompt are: the full
    derivation, the right answer alone, the first step then the right answer (partial sums skipped), a wrong answer."""
    import re
    from types import SimpleNamespace

    from tasks.models.tiny_policy import evaluate_policy

    class Scripted:
        tokenizer = build_tokenizer()

        def generate(self, prompts, params):
            out = []
            for p in prompts:
                full = solution_text(re.search(r"problem: (.*?) =", p).group(1))
                lines = full.splitlines()
                texts = [full, lines[-1], "\n".join([lines[0], lines[-1]]), "\\boxed{999}"]
                out.append([SimpleNamespace(text=texts[i % 4]) for i in range(params.n)])
            return out

    levels = {"two": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
              "six": {"min_terms": 6, "max_terms": 6, "min_digits": 1, "max_digits": 1}}
    report = evaluate_policy(Scripted(), levels, problems_per_level=3, n=4)
    for kind in ("plain", "explain"):
        assert report[kind]["six"]["pass@1"] == report[kind]["two"]["pass@1"] == 0.75  # three right answers of four
        # six terms: only the full derivation states every partial sum; two terms: the first step is the whole derivation
        assert report[f"{kind}_with_derivation"]["six"]["pass@1"] == 0.25
        assert report[f"{kind}_with_derivation"]["two"]["pass@1"] == 0.5
        assert report[f"{kind}_with_derivation"]["six"]["problems"] == 3


def test_the_completion_loss_is_the_models_own_loss_on_the_completion_tokens():
    """The bootstrap applies the output layer only where a label is (GPT-2's vocabulary would make every prompt
    position's logits most of a step): the same number as the model's own loss."""
    import random

    import pytest
    import torch

    from tasks.models.tiny_policy import _batch, _examples, build_model, completion_loss

    cfg = TinyPolicyConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)
    tok = build_tokenizer()
    model = build_model(cfg, tok)
    stream = _examples(cfg, tok, random.Random(0))
    ids, attn, labels = _batch([next(stream) for _ in range(4)], tok)
    with torch.no_grad():
        assert float(completion_loss(model, ids, attn, labels)) == pytest.approx(float(model(input_ids=ids, attention_mask=attn,
                                                                                          labels=labels).loss), rel=1e-5)
