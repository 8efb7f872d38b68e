"""ExpRL's steps cut on the token stream (`judge.step_split: "###"`), as the authors cut them: a step ends
at the token where its text ends with the delimiter, the delimiter belongs to the step it closes, the last
step runs to the end; the grade stage judges those steps and the token advantages follow their spans."""

import pytest

from tasks.core.store import Store
from tasks.models import judge
from tasks.models.judge import RuleJudge, Trace, completion_steps, split_steps
from tasks.models.token_text import token_steps
from tasks.registry import parse_config
from tasks.stages import grade, rubric
from tasks.stages._advantages import step_advantages, token_advantages


def straddling_tokenizer():
    """Characters, plus the merges `##` and `# `: `###\\n` is `##`,`#`,`\\n` (the text ends with `###` at `#`),
    `### ` is `##`,`# ` (a token straddles the delimiter: the text never ends with `###`)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<|end|>"] + chars + ["##", "# "])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("#", "#"), ("#", " ")], unk_token="<unk>"))
    tok.add_special_tokens(["<pad>", "<unk>", "<|end|>"])
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|end|>",
                                   clean_up_tokenization_spaces=False)


REF = "12 + 7 = 19\n19 - 3 = 16\nThe answer is 16."
# header 1 "### A" straddles (no cut there); "###\n" ends a step at its last `#`
TEXT = "### A\n12 + 7 = 19\n###\n19 - 3 = 16\n###\n\\boxed{16}"


def test_token_steps_cut_where_the_decoded_text_ends_with_the_delimiter():
    assert token_steps(["a", "##", "#", "b", "###", "c"]) == [(0, 3), (3, 5), (5, 6)]  # the delimiter closes its step
    assert token_steps(["a", "##", "# b", "c"]) == [(0, 4)]  # a token straddles the delimiter: no cut
    assert token_steps(["x", "###"]) == [(0, 2)]  # ends on the delimiter: no empty last step
    assert token_steps([]) == []
    assert split_steps("a###b###", "###") == ["a###", "b###"]  # characters as tokens


def test_steps_follow_the_tokens_and_token_advantages_follow_the_spans_exactly():
    tok = straddling_tokenizer()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([t]) for t in ids]
    assert pieces[:3] == ["##", "# ", "A"] and "".join(pieces) == TEXT  # the first header straddles the delimiter
    steps, spans = completion_steps(tok, TEXT, ids)
    assert steps == ["### A\n12 + 7 = 19\n###", "\n19 - 3 = 16\n###", "\n\\boxed{16}"]
    assert len(split_steps(TEXT, "###")) == 4  # characters would cut at the straddled header too
    assert spans[0][0] == 0 and spans[-1][1] == len(ids) and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    # the judge grades those steps; each token gets its step's advantage
    g = RuleJudge("process", "###", "segment").grade_one(Trace("s", "p", "q", REF, TEXT, True, steps=steps))
    assert g["steps"] == steps and g["step_scores"] == [1.0, 1.0, 1.0]
    scores = [0.25, 1.0, 0.5]  # hand-set: advantages s1 - s3 = -0.25, s2 - s1 = 0.75, s3 - s2 = -0.5
    adv = token_advantages({"completion": TEXT, "completion_token_ids": ids}, {"parse_ok": True, "step_scores": scores, "steps": steps},
                           tok, "###")
    assert step_advantages(scores) == [-0.25, 0.75, -0.5]
    want = [-0.25] * (spans[0][1] - spans[0][0]) + [0.75] * (spans[1][1] - spans[1][0]) + [-0.5] * (spans[2][1] - spans[2][0])
    assert adv == want and len(adv) == len(ids)
    # the closing `#` of "###\n" is the last token of step 1: the advantage changes right after it
    k = spans[0][1]
    assert pieces[k - 1] == "#" and pieces[k] == "\n" and adv[k - 1] == -0.25 and adv[k] == 0.75
    # grades of another cut (a step count that does not match the tokens' spans) give no token advantages
    assert token_advantages({"completion": TEXT, "completion_token_ids": ids}, {"parse_ok": True, "step_scores": [1.0, 1.0]}, tok, "###") is None


def test_the_grade_stage_cuts_on_the_policys_tokens(tmp_path):
    from tasks.core.schemas import to_table

    tok = straddling_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    store = Store(tmp_path / "ws")
    problem = {"problem_id": "p1", "question": "What is 12 + 7 - 3?", "answer": "16", "reference_solution": REF,
               "source": "test", "level": "hard", "split": "train", "metadata": "{}"}
    cur = store.write("curate", "k-curate", {"problems": ("problems", to_table([problem], "problems"))}, config={}, inputs={}, stage_version="test")
    rows = [{"sample_id": f"s{i}", "problem_id": "p1", "sample_idx": i, "prompt": "q", "completion": c,
             "completion_token_ids": ids, "behaviour_logprobs": [-0.1] * len(ids) if ids else None, "temperature": 1.0,
             "finish_reason": "stop", "extracted_answer": None, "correct": True, "policy_id": "pol", "prompt_kind": "plain",
             "guidance": None, "loss_prompt": "q", "loss_logprobs": None, "level": "hard", "error": None}
            for i, (c, ids) in enumerate([(TEXT, tok(TEXT, add_special_tokens=False)["input_ids"]), (TEXT, [])])]
    ro = store.write("rollouts", "k-rollouts", {"rollouts": ("rollouts", to_table(rows, "rollouts"))}, config={}, inputs={}, stage_version="test")
    up = {"curate": cur, "rollouts": ro}
    config = parse_config({"problems": {"sources": [{"file": "x.jsonl"}]}, "policy": {"tokenizer": str(tmp_path / "tok")},
                           "judge": {"backend": "rule", "mode": "process", "process_protocol": "segment", "step_split": "###"}},
                          base_dir=tmp_path)
    up["rubric"], _ = rubric.STAGE.run(config, store, up)
    out, _ = grade.STAGE.run(config, store, up)
    got = out.read("grades").to_pylist()
    want = ["### A\n12 + 7 = 19\n###", "\n19 - 3 = 16\n###", "\n\\boxed{16}"]
    assert [g["steps"] for g in got] == [want, want]  # a text-only server's row: its text tokenized, the same cut
    assert grade.settings(config)["tokenizer"] == str(tmp_path / "tok")  # another tokenizer, other steps: another output
    bad = parse_config({"problems": {"sources": [{"file": "x.jsonl"}]}, "policy": {"tokenizer": str(tmp_path / "none")},
                        "judge": {"step_split": "###"}}, base_dir=tmp_path)
    with pytest.raises(ValueError, match=r"step_split \"###\" cuts steps on the policy's tokens: .*none is not a directory"):
        grade.step_tokenizer(bad)
    assert judge.DELIMITER == "###"
