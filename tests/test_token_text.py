"""Tokens and text on tokenizers nobody here wrote: GPT-2's byte-level BPE (data/models/tiny-gpt2bpe) and a
SentencePiece BPE with byte fallback (data/models/tiny-spm), beside the character one. Each mapping from token ids
to text positions (tasks/models/token_text.py) is checked against decoding every prefix, and the traces that broke
the old summed single-token decodes are kept as witnesses."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tasks.models.answers import answer_region, check
from tasks.models.judge import judge_view, split_steps, steps_of_tokens
from tasks.models.token_text import (common_prefix_length, continuation_text, decode_completion, prompt_ids, stop_token_ids,
                                     suffix_ids, token_spans)
from tasks.report.alignment import check_prompt, prefix_starts, reference_token_steps, trl_ids
from tasks.stages._advantages import step_advantages, token_advantages

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"char": "tiny-policy", "gpt2-bpe": "tiny-gpt2bpe", "spm": "tiny-spm"}
REAL = ("gpt2-bpe", "spm")
# the issue's trace: three lines with √, ≤ and π (a character split over tokens in GPT-2's BPE)
TRACE = "√16 = 4 and 4 ≤ 5\n4 × π ≈ 12.57\nso \\boxed{4}"
UNICODE = ["√81 − 4 = 5, ½ of 18 is 9", "У Маши 5 яблок, она купила ещё 8.", "小明有 12 个苹果，又买了 7 个。", "x ≥ 3 ≤ π"]


@pytest.fixture(scope="module", params=list(MODELS))
def tok(request):
    t = AutoTokenizer.from_pretrained(str(ROOT / "data" / "models" / MODELS[request.param]))
    t.kind = request.param
    return t


def _ids(tok, text):
    return prompt_ids(tok, text)


def _summed_single_decodes(tok, ids):
    """The old way (never again): each token decoded alone, lengths added up."""
    out, at = [], 0
    for i in ids:
        out.append(at)
        at += len(tok.decode([i]))
    return out


def test_spans_are_the_growth_of_decoded_prefixes(tok):
    texts = [TRACE] + UNICODE if tok.kind != "char" else [TRACE.replace("√", "r").replace("≤", "<").replace("×", "*").replace("π", "p")
                                                                .replace("≈", "~")]
    rng = random.Random(0)
    for text in texts:
        ids = _ids(tok, text)
        decoded, spans = token_spans(tok, ids)
        ref_text, starts, ends = prefix_starts(tok, ids)
        assert decoded == ref_text == decode_completion(tok, ids)
        assert [a for a, _ in spans] == starts and [b for _, b in spans] == ends
    # ids nobody would write: random ones, special tokens among them
    for _ in range(20):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 30))]
        decoded, spans = token_spans(tok, ids)
        assert "".join(decoded[a:b] for a, b in spans) == decoded == decode_completion(tok, ids)


def test_a_character_over_two_tokens_and_sentencepiece_spaces_break_summed_single_decodes():
    """The witnesses: GPT-2 splits √ and π over two tokens each (each part alone decodes to U+FFFD); SentencePiece
    decodes `▁+` alone as `+`. Summed single decodes put tokens at the wrong place; the spans do not."""
    for kind in REAL:
        t = AutoTokenizer.from_pretrained(str(ROOT / "data" / "models" / MODELS[kind]))
        ids = _ids(t, TRACE)
        ref_text, starts, _ = prefix_starts(t, ids)
        assert _summed_single_decodes(t, ids) != starts  # the old way is wrong here
        assert [a for a, _ in token_spans(t, ids)[1]] == starts
    gpt2 = AutoTokenizer.from_pretrained(str(ROOT / "data" / "models" / MODELS["gpt2-bpe"]))
    assert any(gpt2.decode([i]) == "\ufffd" for i in _ids(gpt2, "√"))  # √ is two tokens


SPLIT_TEXTS = {"auto": TRACE, "lines": TRACE, "paragraphs": TRACE.replace("\n", "\n\n"),
               "headers": "### Step 1\n√16 = 4\n### Step 2\n4 ≤ 5, 4 × π ≈ 12.57\n### Answer\n\\boxed{4}",
               "###": "### Step 1: √16 = 4\n### Step 2: 4 ≤ 5 ###\nπ × 4 ≈ 12.57 ### \\boxed{4}"}


@pytest.mark.parametrize("split", list(SPLIT_TEXTS))
def test_token_advantages_land_on_the_tokens_of_their_step(tok, split):
    """Every step_split: each token's advantage is its step's, the step found from decoded-prefix positions."""
    text = SPLIT_TEXTS[split]
    if tok.kind == "char":
        text = text.translate(str.maketrans({"√": "r", "≤": "<", "×": "*", "π": "p", "≈": "~"}))
    ids = _ids(tok, text) + [tok.eos_token_id]
    completion = decode_completion(tok, ids)
    steps = steps_of_tokens(tok, ids)[0] if split == "###" else split_steps(completion, split)
    scores = [round(0.25 * (k % 5), 2) for k in range(1, len(steps) + 1)]
    grade = {"parse_ok": True, "step_scores": scores, "steps": steps}
    adv = token_advantages({"completion": completion, "completion_token_ids": ids}, grade, tok, split)
    step_of = reference_token_steps(tok, ids, split, steps if split != "###" else None, completion)
    per_step = step_advantages(scores)
    assert len(steps) >= 3 and adv == [per_step[k] for k in step_of]


def test_the_issue_trace_gave_three_tokens_the_wrong_step_before():
    """On GPT-2's BPE, the old `token_step_index` (summed single decodes) gave 3 of the trace's tokens another step's
    advantage; the spans give none."""
    from bisect import bisect_right

    t = AutoTokenizer.from_pretrained(str(ROOT / "data" / "models" / MODELS["gpt2-bpe"]))
    ids = _ids(t, TRACE)
    steps = split_steps(TRACE, "auto")
    step_of = reference_token_steps(t, ids, "auto", steps, TRACE)
    located = [TRACE.find(s) for s in steps]
    old = [max(0, bisect_right(located, at) - 1) for at in _summed_single_decodes(t, ids)]
    assert sum(a != b for a, b in zip(old, step_of)) > 0
    adv = token_advantages({"completion": TRACE, "completion_token_ids": ids}, {"parse_ok": True, "step_scores": [0.0, 0.5, 1.0],
                                                                               "steps": steps}, t, "auto")
    assert adv == [step_advantages([0.0, 0.5, 1.0])[k] for k in step_of]


def test_prompt_ids_are_the_chat_templates_own_ids(tok):
    """The sampler's prompt ids (the rendered template's text, nothing added) equal apply_chat_template's ids: one BOS
    where the template writes it (Llama 2), special tokens as their ids (ChatML)."""
    messages = [{"role": "user", "content": "What is √16 × 3?" if tok.kind != "char" else "What is 4 * 3?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = prompt_ids(tok, text)
    assert ids == list(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"])
    assert check_prompt(tok, text) is None
    if tok.kind == "spm":
        assert text.startswith("<s>") and ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
        # the classic mistake: the tokenizer's own BOS added to a text that has one
        doubled = list(tok(text)["input_ids"])
        assert doubled[:2] == [tok.bos_token_id] * 2
    if tok.kind == "gpt2-bpe":
        assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 2


def test_check_prompt_names_a_doubled_bos_and_a_special_token_spelled_as_text():
    spm = AutoTokenizer.from_pretrained(str(ROOT / "data" / "models" / MODELS["spm"]))
    assert "2 BOS" in check_prompt(spm, "<s><s>[INST] hi [/INST]")
    assert check_prompt(spm, "[INST] hi [/INST]") is None  # no BOS written, none there
    gpt2 = AutoTokenizer.from_pretrained(str(ROOT / "data" / "models" / MODELS["gpt2-bpe"]))
    spelled = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert check_prompt(gpt2, spelled) is None
    # the special token's text split into ordinary tokens (as a tokenizer without it as an added token would)
    pieces = gpt2.convert_tokens_to_ids(["<", "|", "im", "_", "start", "|", ">"])
    assert "not the prompt" not in (why := _why_ids(gpt2, spelled, pieces)) and "'<|im_start|>' is 2 times" in why


def _why_ids(tok, text, pieces):
    """check_prompt's verdict on a tokenizer whose ids for ``text`` spell its first special token as ``pieces``."""
    class Spelled:
        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, t, add_special_tokens=False):
            ids = prompt_ids(tok, t)
            first = tok.convert_tokens_to_ids("<|im_start|>")
            k = ids.index(first)
            return {"input_ids": ids[:k] + pieces + ids[k + 1:]}

    return check_prompt(Spelled(), text)


def test_a_sentencepiece_completion_keeps_its_space_after_the_prompt_and_trl_tokenizes_it_back():
    spm = AutoTokenizer.from_pretrained(str(ROOT / "data" / "models" / MODELS["spm"]))
    prompt = spm.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}], tokenize=False, add_generation_prompt=True)
    sampled = suffix_ids(spm, prompt, " 12 + 7 = 19\n\\boxed{19}") + [spm.eos_token_id]  # as the policy writes it
    alone = decode_completion(spm, sampled)
    cont = continuation_text(spm, prompt, sampled)
    assert alone == "12 + 7 = 19\n\\boxed{19}" and cont == " " + alone  # decoded alone, the first word loses its space
    p, c = trl_ids(spm, prompt, cont)
    assert p == prompt_ids(spm, prompt) and c == sampled  # TRL's tokenization of the pair is the sampled sequence
    assert trl_ids(spm, prompt, alone)[1] != sampled  # the completion text alone would train other ids


def test_answers_are_read_after_the_reasoning_block():
    problem = {"answer": "4", "metadata": "{}"}
    assert answer_region("<think>\n\\boxed{7}\n</think>\n\n\\boxed{4}") == "\n\n\\boxed{4}"
    assert check("<think>\nmaybe \\boxed{4}\n</think>\n\n\\boxed{7}", problem) == ("7", False)  # a box in the reasoning is not the answer
    assert check("<think>\n2 + 2 = 4\n</think>\n\n\\boxed{4}", problem) == ("4", True)
    assert check("<think>\n2 + 2 = 4 so \\boxed{4}", problem) == (None, False)  # never closed: ran out while thinking
    assert check("2 + 2 = 4\n\\boxed{4}", problem) == ("4", True)  # no block: the whole completion
    view = judge_view("<think>\n2 + 2 = 4\n</think>\n\n\\boxed{4}")
    assert "think>" not in view and split_steps(view, "auto") == ["2 + 2 = 4", "\\boxed{4}"]
    # a marker inside a line breaks it: every step is a piece of the completion
    raw = "<think>\n76 + 41 = 118\n</think>\n\n\\boxed{ answers</think>\n\\boxed{-5}"
    assert all(step in raw for step in split_steps(judge_view(raw), "auto"))
    assert judge_view("plain text\n") == "plain text\n"


def test_generation_stops_at_every_eos_of_the_generation_config():
    """The ChatML policy's generation config lists <|im_end|> and <|endoftext|> (as Qwen's do); the backend stops at
    either, and the tokenizer alone stops at its eos."""
    from transformers import GenerationConfig

    path = ROOT / "data" / "models" / MODELS["gpt2-bpe"]
    t = AutoTokenizer.from_pretrained(str(path))
    gc = GenerationConfig.from_pretrained(str(path))
    im_end, eot = t.convert_tokens_to_ids("<|im_end|>"), t.convert_tokens_to_ids("<|endoftext|>")
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == [im_end, eot]
    assert stop_token_ids(t, gc) == [im_end, eot] and stop_token_ids(t) == [im_end]


def test_the_gpt2_policy_samples_a_reasoning_block_and_stops_at_im_end():
    from tasks.models.generation import SamplingParams
    from tasks.models.prompts import chat, fill, load_template
    from tasks.models.transformers_backend import TransformersBackend

    be = TransformersBackend(ROOT / "data" / "models" / MODELS["gpt2-bpe"], batch_size=8)
    prompt = chat(be.tokenizer, fill(load_template("tiny_plain"), "State the final answer to the following arithmetic problem: 3 + 4 ="))
    (samples,) = be.generate([prompt], SamplingParams(n=4, temperature=1.0, max_new_tokens=48, seed=1))
    im_end = be.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for s in samples:
        assert s.finish_reason == "stop" and s.token_ids[-1] == im_end and im_end not in s.token_ids[:-1]
        assert s.text == decode_completion(be.tokenizer, s.token_ids) and "<|im_end|>" not in s.text
        assert s.text.startswith("<think>") and "</think>" in s.text
    assert sum(check(s.text, {"answer": "7", "metadata": "{}"})[1] for s in samples) >= 2


def test_retokenized_server_text_keeps_logprobs_only_where_tokens_match_one_for_one():
    """A text-only server's answer, re-tokenized: SentencePiece tokens with their word's space match the server's
    token strings; GPT-2 tokens inside a character (the server writes their bytes) do not, so the server's log-probs
    are not attached to ids they were not for; a text whose ids do not decode back is flagged `mismatch`."""
    from tasks.models.openai_backend import OpenAIBackend

    be = OpenAIBackend.__new__(OpenAIBackend)
    be.tokenizer = AutoTokenizer.from_pretrained(str(ROOT / "data" / "models" / MODELS["spm"]))
    text = "12 + 7 = 19"
    ids = prompt_ids(be.tokenizer, text)
    server_tokens = [text[a:b] for a, b in token_spans(be.tokenizer, ids)[1]]  # what a streaming server reports
    s = be.retokenize(text, "length", server_tokens, [-0.5] * len(ids))
    assert s.token_source == "tokenizer" and s.token_ids == ids and s.logprobs == [-0.5] * len(ids)
    assert any(t.startswith(" ") for t in server_tokens)  # `▁+` is " +" in context, "+" alone
    # a server that decodes with the prompt as context writes the first word's space: the same ids, the row's usual text
    prompt = "<s>[INST] What is 12 + 7? [/INST]"
    sampled = suffix_ids(be.tokenizer, prompt, " 12 + 7 = 19") + [be.tokenizer.eos_token_id]
    s = be.retokenize(" 12 + 7 = 19", "stop")
    assert s.token_source == "tokenizer" and s.token_ids == sampled and s.text == "12 + 7 = 19"
    assert be.retokenize("  x", "length").token_ids == prompt_ids(be.tokenizer, "  x")  # `▁▁`, `x`: "  x" after a word
    be.tokenizer = AutoTokenizer.from_pretrained(str(ROOT / "data" / "models" / MODELS["gpt2-bpe"]))
    ids = prompt_ids(be.tokenizer, "√16 = 4")
    byte_tokens = ["bytes:\\xe2\\x88", "bytes:\\x9a"] + [be.tokenizer.decode([i]) for i in ids[2:]]
    s = be.retokenize("√16 = 4", "length", byte_tokens, [-0.1] * len(ids))
    assert s.token_source == "tokenizer" and s.token_ids == ids and s.logprobs is None
    be.tokenizer = AutoTokenizer.from_pretrained(str(ROOT / "data" / "models" / MODELS["char"]))
    assert be.retokenize("√16 = 4", "stop").token_source == "mismatch"  # √ is no character of the char tokenizer


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4]) == 2 and common_prefix_length([], [1]) == 0


def test_the_builders_make_the_shipped_tokenizers():
    """`guidedrl bootstrap --tokenizer gpt2-bpe|spm` rebuilds the tokenizers the shipped checkpoints have (GPT-2's from
    the openai-whisper source package, tests/consumers.txt; SentencePiece trained again on the same texts)."""
    from tasks.models.tiny_policy import TinyPolicyConfig, tokenizer_corpus
    from tasks.models.tiny_tokenizers import build_tokenizer

    for kind in REAL:
        built = build_tokenizer(kind, tokenizer_corpus(TinyPolicyConfig(tokenizer=kind)) if kind == "spm" else None)
        shipped = AutoTokenizer.from_pretrained(str(ROOT / "data" / "models" / MODELS[kind]))
        assert built.get_vocab() == shipped.get_vocab() and built.chat_template == shipped.chat_template
        for text in [TRACE] + UNICODE:
            assert prompt_ids(built, text) == prompt_ids(shipped, text)
        assert (built.bos_token, built.eos_token) == (shipped.bos_token, shipped.eos_token)
    gpt2 = build_tokenizer("gpt2-bpe")
    assert len(gpt2) == 50261 and gpt2.convert_ids_to_tokens(prompt_ids(gpt2, "Hello world")) == ["Hello", "Ġworld"]


def test_server_ids_keep_the_rows_text_form():
    """A server that returns ids (vLLM's `token_id:N`) and decodes its text with the prompt as context: a SentencePiece
    completion's first space is dropped so the row's text is its ids decoded alone; a text that is not the ids' at
    all is kept as sent (the alignment checker names it)."""
    from types import SimpleNamespace

    from tasks.models.openai_backend import OpenAIBackend

    be = OpenAIBackend.__new__(OpenAIBackend)
    be.tokenizer = AutoTokenizer.from_pretrained(str(ROOT / "data" / "models" / MODELS["spm"]))
    ids = suffix_ids(be.tokenizer, "<s>[INST] What is 12 + 7? [/INST]", " 12 + 7 = 19") + [be.tokenizer.eos_token_id]

    def choice(text):
        lp = SimpleNamespace(tokens=[f"token_id:{i}" for i in ids], token_logprobs=[-0.1] * len(ids), model_extra={})
        return SimpleNamespace(logprobs=lp, finish_reason="stop", text=text)

    s = be._sample(choice(" 12 + 7 = 19"))
    assert s.token_source == "server" and s.token_ids == ids and s.text == "12 + 7 = 19" == decode_completion(be.tokenizer, ids)
    assert be._sample(choice("something else")).text == "something else"
