"""Stage `grade` (ExpRL): every rollout graded against its problem's hidden
reference solution, in outcome or process mode (DESIGN.md, tasks/models/judge.py).

Inputs: `problems` (the reference solutions, never shown to the policy), the
plain `rollouts`, the `rubrics` of stage `rubric`.

Output: dataset `grades` (`sample_id`, `outcome_score` and `step_scores` on the
0–1 scale, both null when `parse_ok` is false, `steps`, `judge`, `judge_raw`,
`parse_ok`, `error`) and a summary: parse rate, score distribution, agreement
of outcome scores with answer correctness, and the judge's request count, cache
hits, retries and format reminders.

The traces are graded in shards of `judge.shard_size` (tasks/core/shards.py). A
trace whose judge request failed after its retries is recorded with its
reason; if more than `judge.max_failed_fraction` of a shard's traces failed,
the shard fails and so does the stage (nothing written for that shard, the
answers received stay cached for the re-run; finished shards are kept).
`judge.max_requests` is checked for the whole stage before anything is sent.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from tasks.core.schemas import to_table
from tasks.core.shards import ShardPlan, make_plan
from tasks.core.stage import Job, Stage
from tasks.core.store import StageOutput, Store
from tasks.models import judge

if TYPE_CHECKING:
    from tasks.registry import Config

#: its settings are the shared `judge` section (tasks/core/config.py: JudgeConfig)
STAGE = Stage(name="grade", version="1", module=__name__, upstream=("curate", "rollouts", "rubric"), writes={"grades": "grades"},
              sharded=True)

log = logging.getLogger("guidedrl.grade")

#: the judge client's counts a grade summary reports
JUDGE_COUNTS = ("requests", "cache_hits", "retries", "reminders", "failed")


def preflight(config: Config) -> None:
    """Before any work: the judge has a model and an endpoint."""
    judge.check_judge(config)


def settings(config: Config) -> dict:
    return {"judge": config.judge.model_dump(mode="json", include={"backend", "mode", "process_protocol", "rubric", "step_split", "model", "temperature", "max_tokens"})}


def inputs(config: Config, upstream: dict[str, StageOutput]) -> dict:
    return {"problems": upstream["curate"].fingerprints["problems"], "rollouts": upstream["rollouts"].fingerprints["rollouts"],
            "rubrics": upstream["rubric"].fingerprints["rubrics"], "prompts:judge": judge.judge_prompts(config).fingerprint()}


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


def make_judge(config: Config, workspace: Path):
    jc = config.judge
    if jc.backend == "rule":
        return judge.RuleJudge(jc.mode, jc.step_split)
    return judge.LLMJudge(judge.open_client(config, workspace), judge.judge_prompts(config), jc.mode, jc.step_split, jc.process_protocol)


def _request_plan(j: judge.LLMJudge, traces: list[judge.Trace]) -> dict:
    texts = [text for _, text, n, _ in j.requests(traces) if n > 0]
    return judge.request_plan(j.client, texts)


def dry_run(config: Config, store: Store, upstream: dict[str, StageOutput]) -> dict:
    """What grading would send, counted before anything is sent (``--dry-run``)."""
    traces = [t for t in load_traces(upstream) if not t.error]
    if config.judge.backend == "rule":
        return {"stage": STAGE.name, "traces": len(traces), "requests": 0, "cached": 0, "note": "rule judge: no requests"}
    return {"stage": STAGE.name, "traces": len(traces), **_request_plan(make_judge(config, store.workspace), traces)}


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
        "judge_requests": {k: stats.get(k, 0) for k in JUDGE_COUNTS},
    }


def plan(job: Job) -> ShardPlan:
    """The traces in shards of `judge.shard_size`. An LLM judge's `judge.max_requests`
    is checked here, for the whole stage, before any shard sends anything."""
    config = job.config
    traces = load_traces(job.upstream)
    jc = config.judge
    if jc.backend != "rule" and jc.max_requests is not None:
        p = _request_plan(make_judge(config, job.workspace), [t for t in traces if not t.error])
        if p["requests"] > jc.max_requests:
            raise judge.JudgeError(f"{STAGE.name}: the judge would send {p['requests']} requests ({p['cached']} more are cached), over "
                                   f"judge.max_requests = {jc.max_requests}; nothing was sent. Raise the limit or grade fewer traces.")
    return make_plan(job, traces, jc.shard_size)


def run_shard(config: Config, shard_plan: ShardPlan, i: int) -> dict:
    """Grade shard ``i``'s traces and write them. Too many failed requests fail the
    shard (nothing written for it; the answers received stay cached)."""
    j = make_judge(config, shard_plan.workspace)
    rows = j.grade(shard_plan.shards[i])
    if isinstance(j, judge.LLMJudge):
        where = STAGE.name if len(shard_plan.shards) == 1 else f"{STAGE.name} shard {i + 1} of {len(shard_plan.shards)}"
        judge.check_failures(where, rows, config.judge.max_failed_fraction, j.client)
    meta = {"judge": j.name, **{k: j.stats.get(k, 0) for k in JUDGE_COUNTS}}
    shard_plan.write(i, to_table(rows, "grades", str(shard_plan.path(i))), meta)
    return meta


def assemble(job: Job, shard_plan: ShardPlan) -> StageOutput:
    """The shards' grades as dataset `grades`, with the parse rate, histograms and judge request counts."""
    parts = shard_plan.tables("grades")
    rows = pa.concat_tables(parts).select(["correct", "outcome_score", "step_scores", "parse_ok", "error"]).to_pylist()
    metas = shard_plan.metas()
    stats = Counter({k: sum(m.get(k, 0) for m in metas) for k in JUDGE_COUNTS})
    mode = shard_plan.stage_cfg["judge"]["mode"]
    name = next((m["judge"] for m in metas), shard_plan.stage_cfg["judge"]["backend"])
    summary = {"judge": name, "mode": mode, **summarize(rows, stats)}
    out = job.write({"grades": parts}, summary, dataset_summaries={"grades": summary})
    shard_plan.clean()
    log.info("grade: %d of %d traces graded by %s (%s mode; parse rate %s, mean outcome %s, agreement with correctness %s; "
             "requests %s) -> %s", summary["graded"], summary["traces"], name, mode, summary["parse_rate"],
             summary["mean_outcome_score"], summary["agreement_with_correctness"], summary["judge_requests"], out.path)
    return out


def describe(s: dict) -> str:
    return (f"{s.get('graded')} of {s.get('traces')} traces graded by {s.get('judge')} ({s.get('mode')} mode), "
            f"parse rate {s.get('parse_rate')}")
