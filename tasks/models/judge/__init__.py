"""The ExpRL judge: grades a sampled trace against a reference solution the
policy never saw.

Two judges with one interface (``Judge.grade(items) -> grades``):

- ``RuleJudge`` (``judge.backend: rule``, the default): for references whose
  worked solution carries checkable intermediate results (lines ``a op b = c``,
  as the reasoning-gym arithmetic references do), those results are the rubric,
  and a step earns credit only for stating one of them *as the result of the
  matching operation*. A number that merely appears (an answer copied without
  the step that produces it) earns nothing.
- ``LLMJudge`` (``judge.backend: openai``): the `openai` client against any
  OpenAI-compatible endpoint (``client``: bounded, retried, cached on disk).

Scores are on the 1–5 scale of the papers, stored as (s − 1)/4. Modes:
outcome (one score per trace), process (the trace split into steps, one score
per step: token advantages are s_t − s_(t−1), DESIGN.md), and, with a rubric,
one score per weighted rubric item (reward = weighted sum). Process mode has
three protocols (``judge.process_protocol``): ``trace`` (one request per trace
rating how far along the reference's path each step is), ``prefix`` (one
request per step prefix y≤t) and ``segment`` (one request per step, showing
that step alone: could it be a correct, useful next step on the reference's
path? — the ExpRL authors' main configuration). A judge reply that cannot be
parsed is asked once more with a reminder of the format, then recorded with
``parse_ok = false`` — never turned into a 0 or a 1.

The package, one job a module: ``traces`` (what is graded: traces, their steps, grade rows), ``rule`` (the
rule judge), ``client`` (the HTTP client and its cache), ``llm`` (prompts, reply parsing, ``LLMJudge``). Its
names are used as ``judge.<name>``.
"""

from tasks.models.judge.client import JudgeClient, Reply, RequestCache, check_failures, estimate_tokens, open_client, request_plan
from tasks.models.judge.llm import (REMINDER, JudgePrompts, LLMJudge, ask, check_judge, fill_template, grading_request, judge_prompts,
                                    make_judge, parse_numbered, parse_rubric, parse_score, prefix_requests, segment_requests)
from tasks.models.judge.rule import Checkpoint, RuleJudge, checkpoints, derivation_right, equations, rule_rubric, segment_score
from tasks.models.judge.traces import (DELIMITER, JudgeError, Trace, completion_steps, grade_row, judge_view, reference_text, split_steps,
                                       steps_of_tokens, to_reward)

__all__ = ["DELIMITER", "Checkpoint", "JudgeClient", "JudgeError", "JudgePrompts", "LLMJudge", "REMINDER", "Reply", "RequestCache",
           "RuleJudge", "Trace", "ask", "check_failures", "check_judge", "checkpoints", "completion_steps", "derivation_right",
           "equations", "estimate_tokens", "fill_template", "grade_row", "grading_request", "judge_prompts", "judge_view", "make_judge",
           "open_client", "parse_numbered", "parse_rubric", "parse_score", "prefix_requests", "reference_text", "request_plan",
           "rule_rubric", "segment_requests", "segment_score", "split_steps", "steps_of_tokens", "to_reward"]
