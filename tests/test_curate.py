import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.models.answers import chain_sum_reference
from tasks.stages.curate import ProblemsConfig, SourceError, curate, normalize_text, problem_id
from tests.conftest import chain_sum, write_jsonl

GSM = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?"


def _cfg(sources, **kw) -> ProblemsConfig:
    return ProblemsConfig.model_validate({"sources": sources, **kw})


def _rejected(result, word):
    return [r for r in result.rejected if r["reason"].startswith(word)]


def test_problem_id_is_stable_under_normalisation():
    a = problem_id("What is  1/2 +\u00a01/4?")
    assert a == problem_id("what is 1/2 + 1/4?  ") == problem_id("WHAT IS 1/2\r\n+ 1/4?")
    assert a != problem_id("What is 1/2 + 1/3?")
    assert normalize_text("  a\u00a0\u00a0b \r\n\r\n\r\n\r\nc  ") == "a b\n\nc"
    assert normalize_text("\uff11\uff12") == "12"  # NFKC: full-width digits


def test_duplicates_do_not_survive(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [
        {"question": "What is 2+2?", "answer": "4"},
        {"question": "what is  2+2? ", "answer": "4"},  # same after normalisation
        {"question": "WHAT IS 2+2?", "answer": "5"},  # same question, other answer
        {"question": "What is 3+3?", "answer": "6"},
    ])
    res = curate(_cfg([{"file": str(f)}], eval_fraction=0))
    assert [p["question"] for p in res.problems] == ["What is 2+2?", "What is 3+3?"]
    assert len({p["problem_id"] for p in res.problems}) == len(res.problems)
    assert len(_rejected(res, "duplicate:")) == 1
    conflict = _rejected(res, "conflicting_duplicate:")
    assert len(conflict) == 1 and "'5'" in conflict[0]["reason"] and json.loads(conflict[0]["row"])["answer"] == "5"
    assert res.summary["rejected_by_reason"] == {"conflicting_duplicate": 1, "duplicate": 1}


def test_duplicates_across_sources_do_not_survive(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"question": "What is 2+2?", "answer": "4"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"q": "What is 2+2?", "a": 4}])
    res = curate(_cfg([{"file": str(a)}, {"file": str(b), "columns": {"question": "q", "answer": "a"}, "allow_empty": True}]))
    assert len(res.problems) == 1 and res.problems[0]["source"] == "a"
    assert _rejected(res, "duplicate:")[0]["source"] == "b"


def test_contaminated_train_row_is_rejected(tmp_path):
    ev = write_jsonl(tmp_path / "eval.jsonl", [{"question": GSM, "answer": "72"}])
    tr = write_jsonl(tmp_path / "train.jsonl", [
        {"question": GSM + " Show your work.", "answer": "72"},  # near-duplicate of the eval problem
        {"question": "A farmer has 3 cows and buys 4 more. How many cows does the farmer have now?", "answer": "7"},
    ])
    res = curate(_cfg([{"file": str(ev), "split": "eval"}, {"file": str(tr), "split": "train"}]))
    kept = {p["question"] for p in res.problems}
    assert GSM in kept and GSM + " Show your work." not in kept
    assert any("cows" in q for q in kept)
    (bad,) = _rejected(res, "contaminated:")
    assert "Show your work" in json.loads(bad["row"])["question"]
    assert problem_id(GSM) in bad["reason"]


def test_decontamination_threshold_comes_from_config(tmp_path):
    ev = write_jsonl(tmp_path / "eval.jsonl", [{"question": GSM, "answer": "72"}])
    tr = write_jsonl(tmp_path / "train.jsonl", [{"question": GSM + " Show your work.", "answer": "72"}])
    srcs = [{"file": str(ev), "split": "eval"}, {"file": str(tr), "split": "train"}]
    assert len(curate(_cfg(srcs, decontamination={"threshold": 1.0})).problems) == 2
    assert len(curate(_cfg(srcs, decontamination={"enabled": False})).problems) == 2


def test_template_ngrams_do_not_count_as_contamination():
    """chain_sum questions share a template sentence; only the expression matters."""
    src = chain_sum(300, 3, terms=None, min_terms=3, max_terms=4, min_digits=2, max_digits=3)
    res = curate(_cfg([src], eval_fraction=0.5))
    assert res.summary["eval"] > 100 and res.summary["train"] > 100
    assert _rejected(res, "contaminated:") == []
    # without the template rule, the shared template sentence makes unrelated sums look contaminated
    res2 = curate(_cfg([src], eval_fraction=0.5, decontamination={"template_fraction": 1.0}))
    assert len(_rejected(res2, "contaminated:")) >= 10


def test_split_is_deterministic_by_id_and_can_be_fixed(tmp_path):
    src = chain_sum(200, 0, "easy", terms=None)
    a = curate(_cfg([src], eval_fraction=0.25))
    b = curate(_cfg([src], eval_fraction=0.25))
    assert [(p["problem_id"], p["split"]) for p in a.problems] == [(p["problem_id"], p["split"]) for p in b.problems]
    frac = a.summary["eval"] / a.summary["problems"]
    assert 0.15 < frac < 0.35
    assert {p["level"] for p in a.problems} == {"easy"}
    c = curate(_cfg([src], eval_fraction=0.25, split_seed=7))
    assert [p["split"] for p in a.problems] != [p["split"] for p in c.problems]
    forced = curate(_cfg([{**src, "split": "eval"}]))
    assert {p["split"] for p in forced.problems} == {"eval"}


def test_chain_sum_reference_solution_is_left_to_right_partial_sums():
    assert chain_sum_reference("12 + 7 - 30") == "12 + 7 = 19\n19 - 30 = -11\nThe answer is -11."
    src = chain_sum(30, 0, terms=None, allow_negation=True)
    res = curate(_cfg([src], eval_fraction=0))
    for p in res.problems:
        lines = p["reference_solution"].splitlines()
        assert lines[-1] == f"The answer is {p['answer']}."
        expr = json.loads(p["metadata"])["reasoning_gym"]["entry"]["metadata"]["expression"]
        total = int(expr.split()[0])
        for line in lines[:-1]:  # every partial sum is right and follows the previous one
            left, result = line.split(" = ")
            a, op, b = left.split(" ")
            assert int(a) == total
            total = int(a) + int(b) if op == "+" else int(a) - int(b)
            assert int(result) == total
        assert str(total) == p["answer"]


def test_unusable_rows_are_rejected_with_a_reason(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [
        {"question": "ok?", "answer": "1"},
        {"question": "   ", "answer": "1"},
        {"question": "no answer?"},
        {"question": "blank answer?", "answer": ""},
        '{"question": "broken json", ',
        "[1, 2]",
        {"question": ["a", "list"], "answer": "1"},
        {"question": "bad split", "answer": "1", "split": "test"},
    ])
    res = curate(_cfg([{"file": str(f)}], eval_fraction=0))
    assert [p["question"] for p in res.problems] == ["ok?"]
    reasons = [r["reason"] for r in res.rejected]
    assert reasons[0].startswith("empty_question")
    assert reasons[1].startswith("no_answer") and reasons[2].startswith("no_answer")
    assert reasons[3].startswith("unparseable: line 5: not valid JSON")
    assert reasons[4].startswith("unparseable: line 6: a JSON list, expected an object")
    assert reasons[5].startswith("bad_type: question is a list")
    assert reasons[6].startswith("bad_split: split 'test'")
    assert res.summary["by_source"]["p"] == {"read": 8, "rejected": 7, "train": 1}


def test_malformed_files_name_the_file(tmp_path):
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,answer\nWhat is 1+1?,2\n")
    with pytest.raises(SourceError, match=r"p\.csv: no column 'question' for `question`.*map it with `columns"):
        curate(_cfg([{"file": str(csv)}]))
    with pytest.raises(SourceError, match=r"p\.csv: no column 'solution' for `answer` \(columns: \['answer', 'prompt'\]\)$"):
        curate(_cfg([{"file": str(csv), "columns": {"question": "prompt", "answer": "solution"}}]))
    bad_pq = tmp_path / "p.parquet"
    bad_pq.write_text("this is not parquet")
    with pytest.raises(SourceError, match=r"p\.parquet: cannot be read as Parquet"):
        curate(_cfg([{"file": str(bad_pq)}]))
    js = tmp_path / "p.json"
    js.write_text('{"question": "not a list"}')
    with pytest.raises(SourceError, match=r"p\.json: expected a JSON list"):
        curate(_cfg([{"file": str(js)}]))
    js.write_text("[{")
    with pytest.raises(SourceError, match=r"p\.json: not valid JSON"):
        curate(_cfg([{"file": str(js)}]))
    txt = tmp_path / "p.txt"
    txt.write_text("x")
    with pytest.raises(SourceError, match=r"p\.txt: cannot tell the format"):
        curate(_cfg([{"file": str(txt)}]))
    with pytest.raises(SourceError, match=r"missing\.jsonl: problem file not found"):
        curate(_cfg([{"file": str(tmp_path / "missing.jsonl")}]))
    with pytest.raises(SourceError, match=r"reasoning_gym task 'no_such_task'"):
        curate(_cfg([{"reasoning_gym": {"task": "no_such_task", "size": 2}}]))


def test_csv_and_parquet_sources_with_column_mapping(tmp_path):
    csv = tmp_path / "p.csv"
    csv.write_text('prompt,sol,difficulty\n"What is 1+1, really?",2,L1\nWhat is 2+3?,5,L2\n')
    pqf = tmp_path / "p.parquet"
    pq.write_table(pa.table({"q": ["What is 9-3?"], "a": [6], "extra": ["kept in metadata"]}), pqf)
    res = curate(_cfg([
        {"file": str(csv), "columns": {"question": "prompt", "answer": "sol", "level": "difficulty"}},
        {"file": str(pqf), "columns": {"question": "q", "answer": "a"}, "source": "mine"},
    ], eval_fraction=0))
    got = {(p["question"], p["answer"], p["level"], p["source"]) for p in res.problems}
    assert got == {("What is 1+1, really?", "2", "L1", "p"), ("What is 2+3?", "5", "L2", "p"), ("What is 9-3?", "6", None, "mine")}
    meta = json.loads(next(p for p in res.problems if p["source"] == "mine")["metadata"])
    assert meta["row"] == {"extra": "kept in metadata"}


def test_hugging_face_sources_from_local_disk(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"problem": ["What is 4*4?", "What is 5*5?"], "solution": ["16", "25"]})
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "files.parquet"))
    res = curate(_cfg([
        {"hf": {"path": str(tmp_path / "saved")}, "columns": {"question": "problem", "answer": "solution"}},
        {"hf": {"format": "parquet", "data_files": str(tmp_path / "files.parquet")},
         "columns": {"question": "problem", "answer": "solution"}, "source": "again", "allow_empty": True},
    ], eval_fraction=0))
    assert sorted(p["answer"] for p in res.problems) == ["16", "25"]
    assert len(_rejected(res, "duplicate:")) == 2  # the same rows through the second route
    with pytest.raises(SourceError, match="no Hugging Face dataset saved here"):
        curate(_cfg([{"hf": {"path": str(tmp_path / "nothing")}}]))


def test_text_that_is_not_utf8_names_the_file_and_line_and_a_bom_is_accepted(tmp_path):
    utf16 = tmp_path / "u16.jsonl"
    utf16.write_bytes('{"question": "What is 1+1?", "answer": "2"}\n'.encode("utf-16"))
    with pytest.raises(SourceError, match=r"u16.jsonl: UTF-16 text .*save it as UTF-8"):
        curate(_cfg([{"file": str(utf16)}]))
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"question,answer\nWhat is 1+1?,2\nCaf\xe9 costs 3 plus 4?,7\n")
    with pytest.raises(SourceError, match=r"latin.csv: line 3: not UTF-8 text \(byte 0xe9 at offset 34\)"):
        curate(_cfg([{"file": str(latin)}]))
    bom = tmp_path / "bom.csv"
    bom.write_bytes("question,answer\nWhat is 1+1?,2\n".encode("utf-8-sig"))
    assert [p["answer"] for p in curate(_cfg([{"file": str(bom)}], eval_fraction=0)).problems] == ["2"]


def test_a_source_that_yields_no_problems_is_an_error_unless_allowed(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    nulls = write_jsonl(tmp_path / "nulls.jsonl", [{"question": "What is 1+1?", "answer": None}, {"question": "And 2+2?", "answer": None}])
    with pytest.raises(SourceError, match=r"problems.sources.0 \(empty\): yields no problems — 0 rows read, 0 rejected \(no rows\)"):
        curate(_cfg([{"file": str(empty)}]))
    with pytest.raises(SourceError, match=r"problems.sources.0 \(nulls\): yields no problems — 2 rows read, 2 rejected \(no_answer: 2\)"):
        curate(_cfg([{"file": str(nulls)}]))
    assert curate(_cfg([{"file": str(nulls), "allow_empty": True}])).summary["rejected"] == 2


def test_curation_streams_in_parts_and_a_template_sample_finds_the_template(tmp_path, monkeypatch):
    """curate_parts writes problems and rejected rows in parts as it reads (here 64 rows a part), holds ids and
    a sample of questions rather than rows, and gives the rows and summary of one whole pass; a template
    estimated from 100 of a source's 600 questions still keeps template text from counting as contamination."""
    from tasks.stages import curate as curate_mod

    dup = write_jsonl(tmp_path / "dup.jsonl", [{"question": GSM, "answer": "72"}, {"question": GSM.upper(), "answer": "72"},
                                              {"question": GSM + " Show your work.", "answer": "72", "split": "train"}])
    srcs = [chain_sum(600, 3, terms=None, min_terms=3, max_terms=4, min_digits=2, max_digits=3),
            {"file": str(dup), "split": None}, {"file": str(tmp_path / "eval.jsonl"), "split": "eval"}]
    write_jsonl(tmp_path / "eval.jsonl", [{"question": GSM + " Be brief.", "answer": "72"}])
    cfg = _cfg(srcs, eval_fraction=0.5)
    whole = curate(cfg)
    assert _rejected(whole, "duplicate:") and len(_rejected(whole, "contaminated:")) == 1  # only the GSM copy

    monkeypatch.setattr(curate_mod, "PART_ROWS", 64)
    monkeypatch.setattr(curate_mod, "TEMPLATE_SAMPLE", 100)
    problems, rejected, summary = curate_mod.curate_parts(cfg, lambda p: tmp_path / p, tmp_path / "work")
    assert len(problems) == -(-summary["problems"] // 64) > 5 and sorted(p.name for p in (tmp_path / "work").iterdir()) == sorted(
        p.name for p in problems + rejected)  # the accepted-row scratch parts are gone
    rows = [r for p in problems for r in pq.read_table(p).to_pylist()]
    assert rows == whole.problems and "_input_row" not in rows[0]
    assert [r for p in rejected for r in pq.read_table(p).to_pylist()] == whole.rejected
    assert summary == whole.summary


_ODD_ROWS = [  # rows polars cannot take as they are: each makes its block of lines read in Python
    {"question": "bad split", "answer": "1", "split": "test"}, {"question": "Ｆｕｌｌ　width １２?", "answer": "１２"}, {"question": "ctl\x1cchar \x1f end", "answer": "y"},
    {"question": "nbsp\u00a0here", "answer": 3}, {"question": "float", "answer": 3.0}, {"question": "small", "answer": 1e-05},
    {"question": "list answer", "answer": [1]}, {"question": 42, "answer": "42"}, {"question": "null answer", "answer": None},
    '{"question": "broken json", ', "[1, 2]", "   ", {"question": "extra", "answer": "1", "note": "hi"},
    {"question": "twice", "answer": "1", "answer ": "x"}, '{"question": "key twice", "answer": "1", "answer": "2"}',
    {"question": "big", "answer": 12345678901234567890123},
]


def test_jsonl_blocks_read_by_polars_give_the_rows_python_gives(tmp_path, monkeypatch):
    """A JSONL source is parsed by polars a block of lines at a time where the block is plain, line by line in
    Python where not: problems, rejected rows (reasons, line numbers) and the summary are the same as when every
    line is read in Python, with blocks of both kinds in one file."""
    from tasks.stages import _curate_sources

    rows = []
    for i in range(300):
        rows.append({"question": f"Plain  question\t{i} about   {GSM[: i % 90]}\r\n\n\n\nsecond line  ", "answer": str(i % 250),
                     "level": ["easy", "", None][i % 3], **({"split": "eval"} if i % 7 == 0 else {}),
                     **({"reference_solution": ["", "  a \n\n\n b ", "x"][i % 3]} if i % 2 else {})})
        if i % 19 == 0:
            rows.append(_ODD_ROWS[(i // 19) % len(_ODD_ROWS)])
        if i % 50 == 0:
            rows.append({"question": "What is 2+2?", "answer": str(i % 3)})  # duplicates and conflicting ones
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = _cfg([{"file": str(f)}], eval_fraction=0.3, decontamination={"ngram": 4})
    monkeypatch.setattr(_curate_sources, "POLARS_JSONL", False)
    python = curate(cfg)
    monkeypatch.setattr(_curate_sources, "POLARS_JSONL", True)
    monkeypatch.setattr(_curate_sources, "BLOCK_BYTES", 2_000)
    parsed = {"polars": 0, "python": 0}
    plain_block = _curate_sources._plain_block
    monkeypatch.setattr(_curate_sources, "_plain_block", lambda *a: parsed.__setitem__(
        "polars" if (frame := plain_block(*a)) is not None else "python", parsed["polars" if frame is not None else "python"] + 1) or frame)
    polars = curate(cfg)
    assert parsed["polars"] > 10 and parsed["python"] > 5
    assert polars.problems == python.problems and polars.rejected == python.rejected and polars.summary == python.summary
    reasons = {r["reason"].split(":")[0] for r in python.rejected}
    assert {"unparseable", "bad_type", "no_answer", "bad_split", "duplicate", "conflicting_duplicate", "contaminated"} <= reasons


def test_the_split_of_a_frame_is_the_split_of_each_id():
    """``splits`` compares digest bytes with ⌈f · 2⁴⁸⌉; ``_split_of`` is the rule as written (u = x / 2⁴⁸ < f): the same
    split for every id, at fractions on and off a power of two."""
    import random

    from tasks.stages._curate_checks import _split_of, splits

    ids = [format(random.Random(i).getrandbits(64), "016x") for i in range(5000)]
    for fraction in (0.0, 0.05, 0.2, 1 / 3, 0.5, 0.999):
        assert splits(ids, 3, fraction) == [_split_of(pid, 3, fraction) for pid in ids]
    assert "eval" in splits(ids, 3, 0.2) and "train" in splits(ids, 3, 0.2)
