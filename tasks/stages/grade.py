"""Stage `grade` (ExpRL): every rollout graded against its problem's hidden
reference solution, in outcome or process mode (DESIGN.md, tasks/models/judge/).

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
from typing import TYPE_CHECKING, Iterator

import pyarrow as pa

from tasks.core.schemas import to_table
from tasks.core.shards import ShardPlan, make_plan
from tasks.core.stage import Job, Stage
from tasks.core.store import StageOutput, Store
from tasks.models import judge
from tasks.models.policy import release_backends

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
    out = {"judge": config.judge.model_dump(mode="json", include={"backend", "mode", "process_protocol", "rubric", "step_split", "model", "temperature", "max_tokens"})}
    if config.judge.step_split == judge.DELIMITER:  # the steps are cut on this tokenizer's tokens
        out["tokenizer"] = config.policy.tokenizer or config.policy.model
    return out


def inputs(config: Config, upstream: dict[str, StageOutput]) -> dict:
    return {"problems": upstream["curate"].fingerprints["problems"], "rollouts": upstream["rollouts"].fingerprints["rollouts"],
            "rubrics": upstream["rubric"].fingerprints["rubrics"], "prompts:judge": judge.judge_prompts(config).fingerprint()}


#: traces read at a time where the stage walks them all (the request plan, ``--dry-run``)
TRACE_BATCH = 8192


def sources(upstream: dict[str, StageOutput]) -> dict[str, Path]:
    """The upstream outputs a shard reads its traces from (a shard carries a row range, not rows)."""
    return {s: upstream[s].path for s in ("curate", "rollouts", "rubric") if s in upstream}


def step_tokenizer(config: Config):
    """The policy's tokenizer when steps are cut on the completion's tokens (``judge.step_split: "###"``), else None."""
    if config.judge.step_split != judge.DELIMITER:
        return None
    path = config.resolve(config.policy.tokenizer or config.policy.model)
    if not path.is_dir():
        raise ValueError(f"judge.step_split \"###\" cuts steps on the policy's tokens: {path} is not a directory "
                         "(set policy.tokenizer to a local tokenizer directory)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load_traces(sources: dict[str, Path], rows: range, tokenizer=None) -> list[judge.Trace]:
    """Rollouts ``rows`` as traces, each with its problem's reference and rubric; only
    those rows and their problems are read (a slice of the scanned Parquet files). With
    ``tokenizer`` (step_split "###"), each trace's steps are cut on its completion's tokens."""
    import polars as pl

    outputs = {s: StageOutput.open(p) for s, p in sources.items()}
    cols = ["sample_id", "problem_id", "completion", "correct", "finish_reason", "error"] + (["completion_token_ids"] if tokenizer else [])
    part = outputs["rollouts"].scan("rollouts").select(cols).slice(rows.start, len(rows)).collect()
    pids = part["problem_id"].unique().implode()
    problems = {p["problem_id"]: p for p in outputs["curate"].scan("problems").filter(pl.col("problem_id").is_in(pids))
                .select("problem_id", "question", "answer", "reference_solution").collect().iter_rows(named=True)}
    rubrics = ({r["problem_id"]: r["items"] for r in outputs["rubric"].scan("rubrics").filter(pl.col("problem_id").is_in(pids))
                .select("problem_id", "items").collect().iter_rows(named=True)} if "rubric" in outputs else {})
    traces = []
    for r in part.iter_rows(named=True):
        p = problems[r["problem_id"]]
        failed = f"generation failed: {r['error'] or 'unknown error'}" if r["finish_reason"] == "error" else None
        steps = [judge.judge_view(s) for s in judge.completion_steps(tokenizer, r["completion"], r["completion_token_ids"])[0]] \
            if tokenizer else None
        traces.append(judge.Trace(r["sample_id"], r["problem_id"], p["question"], judge.reference_text(p), judge.judge_view(r["completion"]),
                                  bool(r["correct"]), rubrics.get(r["problem_id"]), failed, steps))
    return traces


def trace_rows(upstream: dict[str, StageOutput]) -> int:
    return upstream["rollouts"].manifest["datasets"]["rollouts"]["num_rows"]


def _batches(upstream: dict[str, StageOutput], tokenizer=None) -> Iterator[list[judge.Trace]]:
    """Every trace that can be graded (not a failed generation), ``TRACE_BATCH`` at a time."""
    src, n = sources(upstream), trace_rows(upstream)
    for start in range(0, n, TRACE_BATCH):
        yield [t for t in load_traces(src, range(start, min(n, start + TRACE_BATCH)), tokenizer) if not t.error]


def _request_plan(config: Config, workspace: Path, upstream: dict[str, StageOutput]) -> dict:
    """What grading every trace would send (requests not yet cached, tokens) and how many
    traces, counted a batch at a time: nothing is sent."""
    j = judge.make_judge(config, workspace)
    total, plan = Counter(), judge.request_plan(j.client, [])
    for traces in _batches(upstream, step_tokenizer(config)):
        plan = judge.request_plan(j.client, [text for _, text, k, _ in j.requests(traces) if k > 0])
        total.update({k: plan[k] for k in ("requests", "cached", "prompt_tokens", "max_completion_tokens")}, traces=len(traces))
    return {**plan, "requests": 0, "cached": 0, "prompt_tokens": 0, "max_completion_tokens": 0, **total}


def dry_run(config: Config, store: Store, upstream: dict[str, StageOutput]) -> dict:
    """What grading would send, counted before anything is sent (``--dry-run``)."""
    if config.judge.backend == "rule":
        return {"stage": STAGE.name, "traces": sum(map(len, _batches(upstream, step_tokenizer(config)))), "requests": 0, "cached": 0,
                "note": "rule judge: no requests"}
    plan = _request_plan(config, store.workspace, upstream)
    return {"stage": STAGE.name, "traces": plan.pop("traces", 0), **plan}


def summarize(grades: pa.Table, stats: Counter) -> dict:
    """The grade summary from the grades' `correct`, `outcome_score`, `step_scores`, `parse_ok`,
    `error` columns: counts and sums, as polars aggregations (no per-row Python)."""
    import polars as pl

    df = pl.from_arrow(grades).lazy()
    ok_rows = df.filter(pl.col("parse_ok"))
    score, right = pl.col("outcome_score"), pl.col("correct")
    steps = pl.col("step_scores").fill_null([])
    totals = ok_rows.select(
        ok=pl.len(), outcome=score.sum(),
        # do high outcome scores go with right answers? (>= 0.75, a judge score of 4 or 5, reads "reaches the answer")
        agree=((score >= 0.75) == right).sum(),
        right=score.filter(right).sum(), n_right=right.sum(), wrong=score.filter(~right).sum(), n_wrong=(~right).sum(),
        steps=steps.list.sum().sum(), n_steps=steps.list.len().sum(),
    ).collect().row(0, named=True)
    n = df.select(pl.len()).collect().item()
    reasons = (df.filter(~pl.col("parse_ok")).group_by(reason=pl.col("error").fill_null("").str.split(":").list.first())
               .len().collect().rows())
    bins = ok_rows.group_by(bin=(score * 4).round(0) / 4).len().collect().rows()  # round half to even, as Python's round
    ok = totals["ok"]
    mean = lambda total, count: round(total / count, 4) if count else None  # noqa: E731
    return {
        "traces": n,
        "graded": ok,
        "parse_rate": round(ok / n, 4) if n else None,
        "not_graded_by_reason": dict(sorted(reasons)),
        "outcome_histogram": {f"{b:.2f}": c for b, c in sorted(bins)},
        "mean_outcome_score": mean(totals["outcome"], ok),
        "mean_step_score": mean(totals["steps"], totals["n_steps"]),
        "agreement_with_correctness": mean(totals["agree"], ok),
        "mean_outcome_if_correct": mean(totals["right"], totals["n_right"]),
        "mean_outcome_if_wrong": mean(totals["wrong"], totals["n_wrong"]),
        "judge_requests": {k: stats.get(k, 0) for k in JUDGE_COUNTS},
    }


def plan(job: Job) -> ShardPlan:
    """The rollouts' rows in ranges of `judge.shard_size` (a shard reads its own traces). An LLM
    judge's `judge.max_requests` is checked here, for the whole stage, before any shard sends anything."""
    config = job.config
    jc = config.judge
    if jc.backend != "rule" and jc.max_requests is not None:
        p = _request_plan(config, job.workspace, job.upstream)
        if p["requests"] > jc.max_requests:
            raise judge.JudgeError(f"{STAGE.name}: the judge would send {p['requests']} requests ({p['cached']} more are cached), over "
                                   f"judge.max_requests = {jc.max_requests}; nothing was sent. Raise the limit or grade fewer traces.")
    return make_plan(job, range(trace_rows(job.upstream)), shard_size(jc), sources=sources(job.upstream))


def shard_size(jc) -> int:
    """`judge.shard_size`, or its default for the judge's backend."""
    return jc.shard_size or (8192 if jc.backend == "rule" else 512)


def run_shard(config: Config, shard_plan: ShardPlan, i: int) -> dict:
    """Grade shard ``i``'s traces and write them. Too many failed requests fail the
    shard (nothing written for it; the answers received stay cached)."""
    j = judge.make_judge(config, shard_plan.workspace)
    rows = j.grade(load_traces(shard_plan.sources, shard_plan.shards[i], step_tokenizer(config)))
    if isinstance(j, judge.LLMJudge):
        where = STAGE.name if len(shard_plan.shards) == 1 else f"{STAGE.name} shard {i + 1} of {len(shard_plan.shards)}"
        judge.check_failures(where, rows, config.judge.max_failed_fraction, j.client)
    meta = {"judge": j.name, **{k: j.stats.get(k, 0) for k in JUDGE_COUNTS}}
    shard_plan.write(i, to_table(rows, "grades", str(shard_plan.path(i))), meta)
    return meta


def teardown() -> None:
    """After the shards (tasks/core/shards.py): this process's shared policy backends are freed."""
    release_backends()


def assemble(job: Job, shard_plan: ShardPlan) -> StageOutput:
    """The shards' grades as dataset `grades` (the shard files become its parts), with the
    parse rate, histograms and judge request counts added up as polars aggregations over five columns."""
    parts = shard_plan.parts("grades")
    cols = ["correct", "outcome_score", "step_scores", "parse_ok", "error"]
    metas = shard_plan.metas()
    stats = Counter({k: sum(m.get(k, 0) for m in metas) for k in JUDGE_COUNTS})
    mode = shard_plan.stage_cfg["judge"]["mode"]
    name = next((m["judge"] for m in metas), shard_plan.stage_cfg["judge"]["backend"])
    summary = {"judge": name, "mode": mode, **summarize(shard_plan.columns(parts, cols), stats)}
    out = job.write({"grades": parts}, summary, dataset_summaries={"grades": summary})
    shard_plan.clean()
    log.info("grade: %d of %d traces graded by %s (%s mode; parse rate %s, mean outcome %s, agreement with correctness %s; "
             "requests %s) -> %s", summary["graded"], summary["traces"], name, mode, summary["parse_rate"],
             summary["mean_outcome_score"], summary["agreement_with_correctness"], summary["judge_requests"], out.path)
    return out


def describe(s: dict) -> str:
    return (f"{s.get('graded')} of {s.get('traces')} traces graded by {s.get('judge')} ({s.get('mode')} mode), "
            f"parse rate {s.get('parse_rate')}")
