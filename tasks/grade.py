"""Stage `grade` (ExpRL): every rollout graded against its problem's hidden
reference solution, in outcome or process mode (DESIGN.md, tasks/judge.py).

Inputs: `problems` (the reference solutions, never shown to the policy), the
plain `rollouts`, the `rubrics` of stage `rubric`.

Output: dataset `grades` (`sample_id`, `outcome_score` and `step_scores` on the
0–1 scale, both null when `parse_ok` is false, `steps`, `judge`, `judge_raw`,
`parse_ok`, `error`) and a summary: parse rate, score distribution, agreement
of outcome scores with answer correctness, and the judge's request count, cache
hits, retries and format reminders.

A trace whose judge request failed after its retries is recorded with its
reason; if more than `judge.max_failed_fraction` of them failed the stage fails
(nothing written, the answers received stay cached for the re-run).
"""

from __future__ import annotations

import logging
from collections import Counter

from tasks import judge
from tasks.config import Config
from tasks.schemas import to_table
from tasks.store import StageOutput, Store, stage_key

STAGE = "grade"
STAGE_VERSION = "1"

log = logging.getLogger("guidedrl.grade")


def key_for(config: Config, upstream: dict[str, StageOutput]) -> tuple[str, dict, dict]:
    stage_cfg = config.stage_config(STAGE)
    inputs = {"problems": upstream["curate"].fingerprints["problems"], "rollouts": upstream["rollouts"].fingerprints["rollouts"],
              "rubrics": upstream["rubric"].fingerprints["rubrics"], "prompts:judge": judge.judge_prompts(config).fingerprint()}
    return stage_key(STAGE, stage_cfg, inputs, STAGE_VERSION), stage_cfg, inputs


def load_traces(upstream: dict[str, StageOutput]) -> list[judge.Trace]:
    """The rollouts as traces, each with its problem's reference and rubric."""
    problems = {p["problem_id"]: p for p in upstream["curate"].read("problems").to_pylist()}
    rubrics = {r["problem_id"]: r["items"] for r in upstream["rubric"].read("rubrics").to_pylist()} if "rubric" in upstream else {}
    cols = ["sample_id", "problem_id", "completion", "correct", "finish_reason", "error"]
    traces = []
    for r in upstream["rollouts"].read("rollouts").select(cols).to_pylist():
        p = problems[r["problem_id"]]
        failed = f"generation failed: {r['error'] or 'unknown error'}" if r["finish_reason"] == "error" else None
        traces.append(judge.Trace(r["sample_id"], r["problem_id"], p["question"], judge.reference_text(p), r["completion"],
                                  bool(r["correct"]), rubrics.get(r["problem_id"]), failed))
    return traces


def make_judge(config: Config, store: Store):
    jc = config.judge
    if jc.backend == "rule":
        return judge.RuleJudge(jc.mode, jc.step_split)
    return judge.LLMJudge(judge.open_client(config, store.workspace), judge.judge_prompts(config), jc.mode, jc.step_split)


def dry_run(config: Config, store: Store, upstream: dict[str, StageOutput]) -> dict:
    """What grading would send, counted before anything is sent (``--dry-run``)."""
    traces = [t for t in load_traces(upstream) if not t.error]
    if config.judge.backend == "rule":
        return {"stage": STAGE, "traces": len(traces), "requests": 0, "cached": 0, "note": "rule judge: no requests"}
    j = make_judge(config, store)
    texts = [text for _, text, n, _ in j.requests(traces) if n > 0]
    return {"stage": STAGE, "traces": len(traces), **judge.request_plan(j.client, texts)}


def summarize(rows: list[dict], stats: Counter) -> dict:
    ok = [r for r in rows if r["parse_ok"]]
    bins = Counter(f"{round(r['outcome_score'] * 4) / 4:.2f}" for r in ok)
    right = [r["outcome_score"] for r in ok if r["correct"]]
    wrong = [r["outcome_score"] for r in ok if not r["correct"]]
    steps = [s for r in ok for s in (r["step_scores"] or [])]
    mean = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
    return {
        "traces": len(rows),
        "graded": len(ok),
        "parse_rate": round(len(ok) / len(rows), 4) if rows else None,
        "not_graded_by_reason": dict(Counter((r["error"] or "").split(":")[0] for r in rows if not r["parse_ok"])),
        "outcome_histogram": dict(sorted(bins.items())),
        "mean_outcome_score": mean([r["outcome_score"] for r in ok]),
        "mean_step_score": mean(steps),
        # do high outcome scores go with right answers? (>= 0.75, a judge score of 4 or 5, reads "reaches the answer")
        "agreement_with_correctness": mean([float((r["outcome_score"] >= 0.75) == r["correct"]) for r in ok]),
        "mean_outcome_if_correct": mean(right),
        "mean_outcome_if_wrong": mean(wrong),
        "judge_requests": {k: stats.get(k, 0) for k in ("requests", "cache_hits", "retries", "reminders", "failed")},
    }


def run(config: Config, store: Store, upstream: dict[str, StageOutput], force: bool = False) -> tuple[StageOutput, bool]:
    key, stage_cfg, inputs = key_for(config, upstream)
    existing = store.reusable(STAGE, key, force)
    if existing is not None:
        return existing, True
    traces = load_traces(upstream)
    j = make_judge(config, store)
    rows = j.grade(traces)
    if isinstance(j, judge.LLMJudge):
        judge.check_failures(STAGE, rows, config.judge.max_failed_fraction, j.client)
    summary = {"judge": j.name, "mode": config.judge.mode, **summarize(rows, j.stats)}
    out = store.write(STAGE, key, {"grades": ("grades", to_table(rows, "grades", "grade/grades"))}, config=stage_cfg,
                      inputs=inputs, stage_version=STAGE_VERSION, summary=summary, replace=force, dataset_summaries={"grades": summary})
    log.info("grade: %d of %d traces graded by %s (%s mode; parse rate %s, mean outcome %s, agreement with correctness %s; "
             "requests %s) -> %s", summary["graded"], summary["traces"], j.name, config.judge.mode, summary["parse_rate"],
             summary["mean_outcome_score"], summary["agreement_with_correctness"], summary["judge_requests"], out.path)
    return out, False
