"""The ExpRL judge: rule-based grading, the LLM judge over real HTTP, the grade and rubric stages."""

import json
import time

import polars as pl
import pytest

from tasks.core.store import Store
from tasks.models import judge
from tasks.models.judge import JudgeError, RuleJudge, Trace, split_steps
from tasks.stages import grade, rubric
from tests.conftest import tiny_config
from tests.openai_server import OpenAIServer

REF = "12 + 7 = 19\n19 - 3 = 16\nThe answer is 16."
RIGHT = "12 + 7 = 19\n19 - 3 = 16\n\\boxed{16}"


def _trace(completion, correct=None, sid="s", reference=REF, rubric_items=None):
    return Trace(sid, "p1", "What is 12 + 7 - 3?", reference, completion,
                 completion.rstrip().endswith("{16}") if correct is None else correct, rubric_items)


# --------------------------------------------------------------------------- steps and the rule judge


def test_split_steps_headers_then_paragraphs_then_lines():
    assert split_steps("intro\n### One\na\n### Two\nb") == ["intro", "### One\na", "### Two\nb"]
    assert split_steps("first para\nstill first\n\nsecond") == ["first para\nstill first", "second"]
    assert split_steps("a = 1\nb = 2") == ["a = 1", "b = 2"]
    assert split_steps("a = 1\nb = 2", "paragraphs") == ["a = 1\nb = 2"]
    assert split_steps("  \n") == []


def test_rule_judge_credits_results_of_the_matching_operation_only():
    j = RuleJudge("process")
    full = j.grade_one(_trace(RIGHT))
    assert full["parse_ok"] and full["outcome_score"] == 1.0 and full["step_scores"] == [0.5, 1.0, 1.0]
    # the final answer copied without the steps that produce it earns nothing
    for copied in ["\\boxed{16}", "The answer is 16.\n\\boxed{16}", "We get 19, then 16.\n\\boxed{16}",
                   "16 = 16\n\\boxed{16}", "12 + 7 - 3 = 16\n\\boxed{16}", "5 + 11 = 16\n\\boxed{16}"]:
        g = j.grade_one(_trace(copied))
        assert g["parse_ok"] and g["outcome_score"] == 0.0 and set(g["step_scores"]) == {0.0}, copied
    # operands of + in either order; a wrong later step keeps only the first checkpoint
    half = j.grade_one(_trace("7 + 12 = 19\n19 - 3 = 15\n\\boxed{15}"))
    assert half["step_scores"] == [0.5, 0.5, 0.5] and half["outcome_score"] == 0.5
    # a subtraction is not commutative
    assert j.grade_one(_trace("3 - 19 = 16\n\\boxed{16}"))["outcome_score"] == 0.0
    # every checkpoint reached but the boxed answer wrong: on the path, not there
    assert j.grade_one(_trace("12 + 7 = 19\n19 - 3 = 16\n\\boxed{17}"))["outcome_score"] == 0.75
    assert RuleJudge("outcome").grade_one(_trace(RIGHT))["step_scores"] is None


def test_rule_judge_without_checkable_results_records_why_and_no_score():
    g = RuleJudge().grade_one(_trace("\\boxed{16}", reference="The answer is 16."))
    assert not g["parse_ok"] and g["outcome_score"] is None and g["step_scores"] is None
    assert "no checkable intermediate results" in g["error"]


def test_rule_judge_uses_a_given_rubric_and_its_weights():
    items = [{"text": "12 + 7 = 19", "weight": 3.0}, {"text": "19 - 3 = 16", "weight": 1.0}]
    g = RuleJudge().grade_one(_trace("12 + 7 = 19\n\\boxed{16}", rubric_items=items))
    assert g["step_scores"] == [0.75, 0.75]


# --------------------------------------------------------------------------- the LLM judge over HTTP


@pytest.fixture()
def server():
    with OpenAIServer() as srv:
        yield srv


def _llm(server, tmp_path, mode="outcome", protocol="trace", **kw):
    kw = {"max_retries": 1, "timeout": 5.0, **kw}
    client = judge.JudgeClient("judge-model", server.base_url, "GUIDEDRL_TEST_KEY", judge.RequestCache(tmp_path / "cache"), **kw)
    prompts = judge.JudgePrompts.load({"outcome": "judge_outcome", "process": "judge_process", "items": "judge_items", "rubric": "rubric",
                                       "segment": "judge_segment"})
    return judge.LLMJudge(client, prompts, mode, protocol=protocol)


def _chat_requests(server):
    return [r for r in server.behaviour.requests if "messages" in r]


def test_llm_judge_scores_come_from_what_the_client_sent(server, tmp_path):
    traces = [_trace(RIGHT, sid="right"), _trace("12 + 7 = 20\n\\boxed{20}", sid="wrong")]
    rows = _llm(server, tmp_path, "outcome").grade(traces)
    assert [r["outcome_score"] for r in rows] == [1.0, 0.0] and all(r["parse_ok"] for r in rows)
    sent = [r["messages"][0]["content"] for r in _chat_requests(server)]
    assert len(sent) == 2 and all(REF in text and text.count("<reference_solution>") == 1 for text in sent)
    assert sum(RIGHT in text for text in sent) == 1
    rows = _llm(server, tmp_path, "process").grade(traces)
    assert rows[0]["step_scores"] == [0.5, 1.0, 1.0] and rows[1]["step_scores"] == [0.0, 0.0]
    assert rows[0]["outcome_score"] == 1.0 and rows[0]["steps"] == RIGHT.splitlines()


def test_prefix_protocol_scores_each_step_prefix_in_its_own_request(server, tmp_path):
    """ExpRL's process protocol: s_t is the judge's score of the prefix y<=t (one request per step)."""
    traces = [_trace(RIGHT, sid="right"), _trace("12 + 7 = 20\n\\boxed{20}", sid="wrong")]
    j = _llm(server, tmp_path, "process", protocol="prefix")
    assert len(j.requests(traces)) == 5  # what the dry run counts: 3 + 2 steps
    rows = j.grade(traces)
    shown = [r["messages"][0]["content"].split("<student_reasoning>\n")[1].split("\n</student_reasoning>")[0]
             for r in _chat_requests(server)]
    assert sorted(shown) == sorted(["12 + 7 = 19", "12 + 7 = 19\n\n19 - 3 = 16", "12 + 7 = 19\n\n19 - 3 = 16\n\n\\boxed{16}",
                                    "12 + 7 = 20", "12 + 7 = 20\n\n\\boxed{20}"])  # each prefix in its own request
    # prefix 1 ("12 + 7 = 19") does not reach 16; prefixes 2 and 3 do
    assert rows[0]["step_scores"] == [0.0, 1.0, 1.0] and rows[0]["outcome_score"] == 1.0 and rows[0]["parse_ok"]
    assert rows[1]["step_scores"] == [0.0, 0.0]


def test_segment_protocol_shows_each_step_alone_in_its_own_request(server, tmp_path):
    """The ExpRL authors' main protocol: one request per step, that step alone (no earlier step), the
    problem and the whole reference; s_t = (score_t - 1)/4 of step t alone; the outcome is their mean."""
    traces = [_trace(RIGHT, sid="right"), _trace("12 + 7 = 20\n\\boxed{20}", sid="wrong")]
    j = _llm(server, tmp_path, "process", protocol="segment")
    assert len(j.requests(traces)) == 5  # what the dry run counts: 3 + 2 steps
    rows = j.grade(traces)
    sent = [r["messages"][0]["content"] for r in _chat_requests(server)]
    shown = [text.split("<student_step>\n")[1].split("\n</student_step>")[0] for text in sent]
    assert sorted(shown) == sorted(["12 + 7 = 19", "19 - 3 = 16", "\\boxed{16}", "12 + 7 = 20", "\\boxed{20}"])
    assert all(REF in text and "<student_reasoning>" not in text for text in sent)  # the reference whole, no earlier step
    steps = ["12 + 7 = 19", "19 - 3 = 16", "\\boxed{16}", "12 + 7 = 20", "\\boxed{20}"]
    assert all(sum(st in text.split("</reference_solution>")[1] for st in steps) == 1 for text in sent)
    assert rows[0]["step_scores"] == [1.0, 1.0, 1.0] and rows[0]["outcome_score"] == 1.0 and rows[0]["parse_ok"]
    assert rows[1]["step_scores"] == [0.0, 0.0] and rows[1]["outcome_score"] == 0.0
    assert rows[0]["steps"] == RIGHT.splitlines()
    # a step whose reply does not parse (also after the reminder) masks the whole trace, never a 0
    bad = j.grade([_trace("12 + 7 = 19\nJUDGE-NONSENSE\n\\boxed{16}", sid="bad")])[0]
    assert not bad["parse_ok"] and bad["step_scores"] is None and bad["error"].startswith("step 2 of 3: unparseable")


def test_rule_judge_segment_scores_each_step_alone_on_the_authors_scale():
    """5 establishes a checkpoint, 1 contradicts the reference or is wrong, 2 true but off the path, 3 generic;
    the final answer step: 5 when right, 1 when wrong. Token advantages: s_t - s_(t-1), the first s_1 - s_T."""
    from tasks.stages._advantages import step_advantages

    j = RuleJudge("process", protocol="segment")
    text = "12 + 7 = 19\n19 - 3 = 17\n17 + 0 = 17\nLet me check.\n\\boxed{17}"
    g = j.grade_one(_trace(text))
    assert [int(4 * s + 1) for s in g["step_scores"]] == [5, 1, 2, 3, 1]
    assert g["step_scores"] == [1.0, 0.0, 0.25, 0.5, 0.0] and g["outcome_score"] == pytest.approx(0.35)
    assert step_advantages(g["step_scores"]) == [1.0, -1.0, 0.25, 0.25, -0.5]  # by hand from the scores above
    right = j.grade_one(_trace(RIGHT))
    assert right["step_scores"] == [1.0, 1.0, 1.0] and step_advantages(right["step_scores"]) == [0.0, 0.0, 0.0]
    # the trace protocol on the same text: progress after each step, not each step alone
    assert RuleJudge("process").grade_one(_trace(text))["step_scores"] == [0.5, 0.5, 0.5, 0.5, 0.5]
    assert j.grade_one(_trace("12 * 7 = 19"))["step_scores"] == [0.0]  # wrong arithmetic


def test_unparseable_answers_get_one_reminder_then_are_recorded_never_scored(server, tmp_path):
    traces = [_trace("JUDGE-NONSENSE-ONCE\n\\boxed{16}", sid="once"), _trace("JUDGE-NONSENSE\n\\boxed{16}", sid="never")]
    j = _llm(server, tmp_path)
    once, never = j.grade(traces)
    assert once["parse_ok"] and once["outcome_score"] == 1.0
    assert not never["parse_ok"] and never["outcome_score"] is None and never["step_scores"] is None
    assert "reminder" in never["error"] and "good to me" in never["judge_raw"]
    assert j.stats["reminders"] == 2 and j.stats["requests"] == 4
    reminder = _chat_requests(server)[-1]["messages"]
    assert [m["role"] for m in reminder] == ["user", "assistant", "user"] and "SCORE: n" in reminder[-1]["content"]


def test_rate_limits_and_server_errors_are_retried(server, tmp_path):
    server.behaviour.fail_first, server.behaviour.rate_limit_first = 1, 1
    j = _llm(server, tmp_path, max_retries=3)
    rows = j.grade([_trace(RIGHT, sid="a"), _trace("\\boxed{3}", sid="b")])
    assert [r["outcome_score"] for r in rows] == [1.0, 0.0]
    assert j.stats["retries"] == 4 and j.stats["requests"] == 2 and j.stats["failed"] == 0


def test_every_trace_ends_graded_or_failed_with_its_reason_and_a_rerun_sends_only_the_missing(server, tmp_path):
    server.behaviour.hang_seconds = 3.0
    traces = [_trace(RIGHT, sid="ok"), _trace("JUDGE-HANG \\boxed{16}", sid="hang"), _trace("JUDGE-DROP", sid="drop"),
              _trace("ALWAYS-FAIL \\boxed{16}", sid="500"), _trace("JUDGE-NONSENSE", sid="garbage")]
    j = _llm(server, tmp_path, max_retries=0, timeout=1.0)
    t0 = time.time()
    rows = j.grade(traces)
    assert time.time() - t0 < 10
    by = {r["sample_id"]: r for r in rows}
    assert len(rows) == len(traces) and by["ok"]["parse_ok"]
    assert "Timeout" in by["hang"]["error"] and "Connection" in by["drop"]["error"] and "500" in by["500"]["error"]
    assert "reminder" in by["garbage"]["error"]
    with pytest.raises(JudgeError, match=r"3 of 5 judge requests to .* failed after 0 retries"):
        judge.check_failures("grade", rows, 0.5, j.client)
    judge.check_failures("grade", rows, 0.6, j.client)  # within the allowed fraction

    answered = len(_chat_requests(server))
    server.behaviour.hang_seconds = 0.0
    again = _llm(server, tmp_path, max_retries=0, timeout=1.0)
    rows2 = again.grade(traces)
    resent = [r["messages"][0]["content"] for r in _chat_requests(server)[answered:]]
    # only the three failed requests went out again; "ok" and the garbage pair came from the cache
    assert len(resent) == 3 and again.stats["cache_hits"] == 3
    assert not any(RIGHT in text and "JUDGE" not in text for text in resent)
    assert {r["sample_id"]: r["parse_ok"] for r in rows2} == {"ok": True, "hang": True, "drop": False, "500": False, "garbage": False}


def test_spending_guard_refuses_before_sending_anything(server, tmp_path):
    j = _llm(server, tmp_path, max_requests=1)
    with pytest.raises(JudgeError, match="over judge.max_requests = 1; nothing was sent"):
        j.grade([_trace(RIGHT, sid="a"), _trace(RIGHT + " ", sid="b")])
    assert _chat_requests(server) == []


# --------------------------------------------------------------------------- the stages


def _upstream(tmp_path, completions, reference=REF):
    """A store holding a curated problem and rollouts with the given completions."""
    from tasks.core.schemas import to_table

    store = Store(tmp_path / "ws")
    problem = {"problem_id": "p1", "question": "What is 12 + 7 - 3?", "answer": "16", "reference_solution": reference,
               "source": "test", "level": "hard", "split": "train", "metadata": "{}"}
    cur = store.write("curate", "k-curate", {"problems": ("problems", to_table([problem], "problems"))},
                      config={}, inputs={}, stage_version="test")
    rows = [{"sample_id": f"s{i}", "problem_id": "p1", "sample_idx": i, "prompt": "q", "completion": c,
             "completion_token_ids": [1], "behaviour_logprobs": [-0.1], "temperature": 1.0, "finish_reason": "stop",
             "extracted_answer": None, "correct": c.endswith("{16}"), "policy_id": "pol", "prompt_kind": "plain",
             "guidance": None, "loss_prompt": "q", "loss_logprobs": None, "level": "hard", "error": None}
            for i, c in enumerate(completions)]
    ro = store.write("rollouts", "k-rollouts", {"rollouts": ("rollouts", to_table(rows, "rollouts"))},
                     config={}, inputs={}, stage_version="test")
    return store, {"curate": cur, "rollouts": ro}


def _config(tmp_path, **judge_cfg):
    return tiny_config(tmp_path, judge=judge_cfg)


def test_grade_stage_with_the_rule_judge_writes_the_grades_dataset(tmp_path):
    store, up = _upstream(tmp_path, [RIGHT, "\\boxed{16}", "12 + 7 = 19\n\\boxed{19}"])
    config = _config(tmp_path, backend="rule", mode="process")
    up["rubric"], _ = rubric.STAGE.run(config, store, up)
    assert up["rubric"].read("rubrics").to_pylist()[0]["items"] == [{"text": "12 + 7 = 19", "weight": 1.0},
                                                                   {"text": "19 - 3 = 16", "weight": 1.0}]
    out, reused = grade.STAGE.run(config, store, up)
    df = pl.read_parquet(out.dataset_path("grades") / "data" / "*.parquet")
    assert df["outcome_score"].to_list() == [1.0, 0.0, 0.5] and df["step_scores"].to_list()[0] == [0.5, 1.0, 1.0]
    s = out.summary
    assert s["parse_rate"] == 1.0 and s["outcome_histogram"] == {"0.00": 1, "0.50": 1, "1.00": 1}
    assert s["agreement_with_correctness"] == pytest.approx(2 / 3, abs=1e-4)  # the copied answer is right but scores 0
    assert json.loads((out.path / "grades" / "manifest.json").read_text())["summary"]["graded"] == 3
    assert grade.STAGE.run(config, store, up)[1] is True  # reused


def test_grade_shards_are_row_ranges_that_read_their_own_traces(tmp_path, monkeypatch):
    """A grade shard carries a range of rollout rows, not traces; it reads its traces itself. One row per
    shard and two traces per planning batch give the rows, order and summary of one shard."""
    from tasks.core.stage import Job

    completions = [RIGHT, "\\boxed{16}", "12 + 7 = 19\n\\boxed{19}", "12 + 7 = 18\n\\boxed{1}", RIGHT]
    store, up = _upstream(tmp_path, completions)
    one = _config(tmp_path, backend="rule", mode="process")
    up["rubric"], _ = rubric.STAGE.run(one, store, up)
    whole, _ = grade.STAGE.run(one, store, up)
    whole_rows, whole_summary = whole.read("grades").to_pylist(), whole.summary
    monkeypatch.setattr(grade, "TRACE_BATCH", 2)
    per_row = _config(tmp_path, backend="rule", mode="process", shard_size=1)
    job = Job(grade.STAGE, per_row, store, up, *grade.STAGE.key_for(per_row, up))
    shard_plan = grade.plan(job)
    assert shard_plan.shards == [range(i, i + 1) for i in range(5)] and set(shard_plan.sources) == {"curate", "rollouts", "rubric"}
    assert [t.completion for t in grade.load_traces(shard_plan.sources, range(1, 3))] == completions[1:3]
    cut, _ = grade.STAGE.run(per_row, store, up, force=True)  # shard_size is not in the key: the grades do not depend on it
    assert len(list((cut.path / "grades" / "data").glob("*.parquet"))) == 5 and not shard_plan.work.exists()
    assert cut.read("grades").to_pylist() == whole_rows
    assert cut.summary == whole_summary and whole_summary["traces"] == 5
    assert grade.dry_run(per_row, store, up)["traces"] == 5


def test_grade_stage_fails_when_the_judge_is_down_then_a_rerun_pays_only_for_what_is_missing(tmp_path):
    store, up = _upstream(tmp_path, [RIGHT, "12 + 7 = 20\n\\boxed{20}"])
    with OpenAIServer() as srv:
        url = srv.base_url
    config = _config(tmp_path, backend="openai", base_url=url, model="m", mode="process", max_retries=0, timeout_seconds=2)
    up["rubric"], _ = rubric.STAGE.run(config, store, up)
    assert up["rubric"].summary["enabled"] is False and up["rubric"].read("rubrics").num_rows == 0
    with pytest.raises(JudgeError, match=r"2 of 2 judge requests to http://127.0.0.1:\d+/v1 failed after 0 retries \(2x APIConnectionError: Connection error"):
        grade.STAGE.run(config, store, up)
    assert store.outputs("grade") == []  # nothing half-written
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    with OpenAIServer(port=port) as srv:
        plan = grade.dry_run(config, store, up)
        assert plan["requests"] == 2 and plan["cached"] == 0 and plan["prompt_tokens"] > 100
        out, _ = grade.STAGE.run(config, store, up)
        assert [r["step_scores"] for r in out.read("grades").to_pylist()] == [[0.5, 1.0, 1.0], [0.0, 0.0]]
        assert grade.dry_run(config, store, up)["requests"] == 0  # all cached now
        grade.STAGE.run(config, store, up, force=True)
        assert len(_chat_requests(srv)) == 2  # the forced re-run came from the cache


def test_grade_stage_with_the_segment_protocol_counts_and_sends_one_request_per_step(tmp_path):
    store, up = _upstream(tmp_path, [RIGHT, "12 + 7 = 20\n\\boxed{20}"])
    rule = _config(tmp_path, backend="rule", mode="process", process_protocol="segment")
    up["rubric"], _ = rubric.STAGE.run(rule, store, up)
    out, _ = grade.STAGE.run(rule, store, up)
    assert [r["step_scores"] for r in out.read("grades").to_pylist()] == [[1.0, 1.0, 1.0], [0.0, 0.0]]
    with OpenAIServer() as srv:
        config = _config(tmp_path, backend="openai", base_url=srv.base_url, model="m", mode="process", process_protocol="segment")
        plan = grade.dry_run(config, store, up)
        assert plan["requests"] == 5 and plan["traces"] == 2 and not _chat_requests(srv)  # counted, nothing sent
        llm, _ = grade.STAGE.run(config, store, up)
        assert [r["step_scores"] for r in llm.read("grades").to_pylist()] == [[1.0, 1.0, 1.0], [0.0, 0.0]]
        assert len(_chat_requests(srv)) == 5 and llm.summary["judge_requests"]["requests"] == 5
        assert grade.dry_run(config, store, up)["requests"] == 0  # every step's answer is cached


def test_llm_rubric_stage_feeds_item_scores_to_the_grade_stage(tmp_path):
    store, up = _upstream(tmp_path, [RIGHT, "12 + 7 = 19\n\\boxed{19}"])
    with OpenAIServer() as srv:
        config = _config(tmp_path, backend="openai", base_url=srv.base_url, model="m", mode="outcome", rubric=True)
        up["rubric"], _ = rubric.STAGE.run(config, store, up)
        items = up["rubric"].read("rubrics").to_pylist()[0]
        assert items["rubric_model"] == "openai:m" and items["items"][-1] == {"text": "final answer 16", "weight": 2.0}
        out, _ = grade.STAGE.run(config, store, up)
        scores = [r["outcome_score"] for r in out.read("grades").to_pylist()]
        assert scores == [1.0, 0.25]  # weights 1, 1, 2: only the first checkpoint of the second trace
        assert "<rubric>" in _chat_requests(srv)[-1]["messages"][0]["content"]


def test_eval_counts_a_derivation_only_when_every_checkpoint_is_stated():
    from tasks.models.answers import check
    from tasks.models.judge import derivation_right

    j = RuleJudge("outcome")
    problem = {"problem_id": "p1", "question": "1 + 5 + 5 - 3 =", "answer": "8",
               "reference_solution": "1 + 5 = 6\n6 + 5 = 11\n11 - 3 = 8\nThe answer is 8."}
    cases = {"1 + 5 = 6\n6 + 5 = 11\n11 - 3 = 8\n\\boxed{8}": (True, True),
             "5 + 1 = 6\n6 + 5 = 11\n11 - 3 = 8\n\\boxed{8}": (True, True),  # + commutes
             "1 + 4 = 5\n5 + 6 = 11\n11 - 3 = 8\n\\boxed{8}": (True, False),  # a lucky answer by a wrong path
             "\\boxed{8}": (True, False),  # the answer alone
             "1 + 5 = 6\n6 + 5 = 11\n11 - 3 = 7\n\\boxed{7}": (False, False)}
    for text, (answer, derived) in cases.items():
        correct = check(text, problem)[1]
        assert correct == answer, text
        assert derivation_right(j, problem, text, correct) is derived, text
    # no checkable lines in the reference: the answer alone decides
    bare = {**problem, "reference_solution": None}
    assert derivation_right(j, bare, "\\boxed{8}", True) and not derivation_right(j, bare, "\\boxed{7}", False)
