"""Stage `rollouts`: sample G completions per problem from the policy and check them.

Inputs: the curated `problems` (the configured split and levels), the policy
(a checkpoint or a served model) and the `plain` prompt template.

Method: problems are ordered by `problem_id` and cut into shards of
`shard_size` problems. Each shard is generated with its own seed
(`seed + shard index`), checked answer by answer, and written atomically to
`<store>/rollouts/.work-<key>/shard-NNNNN.parquet`. A crashed run resumes at
the first unfinished shard and ends with exactly the rows of an uninterrupted
run. When all shards exist they become the parts of the output dataset.

Outputs: dataset `rollouts` (DESIGN.md's rollout columns, plus `level` and
`error`), and a summary with pass@1 / pass@k by level (unbiased estimator over
the G samples), the number of all-fail problems, and generation time.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Literal

import pyarrow as pa
from pydantic import Field

from tasks.core.config import StrictModel
from tasks.core.schemas import to_table
from tasks.core.shards import ShardPlan, make_plan
from tasks.core.stage import Job, Stage
from tasks.core.store import StageOutput, read_dataset, sha256_bytes
from tasks.models.answers import check
from tasks.models.generation import GenerationBackend, SamplingParams, ScoringUnavailable
from tasks.models.policy import chat_tokenizer, check_policy, policy_id_for, precision_settings, render, shared_backend
from tasks.models.prompts import fill, load_template
from tasks.report.metrics import pass_table


class RolloutsConfig(StrictModel):
    samples_per_problem: int = Field(8, gt=0, description="the group size G")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(160, gt=0)
    seed: int = 0
    split: Literal["train", "eval", "all"] = "train"
    levels: list[str] | None = Field(None, description="only problems of these levels (default: all)")
    max_problems: int | None = Field(None, gt=0, description="at most this many problems (first by problem_id)")
    shard_size: int = Field(32, gt=0, description="problems per shard; a crash resumes at the first unfinished shard")


STAGE = Stage(name="rollouts", version="2", module=__name__, upstream=("curate",), writes={"rollouts": "rollouts"},
              section="rollouts", settings_model=RolloutsConfig, sharded=True)

log = logging.getLogger("guidedrl.rollouts")


def sample_id(problem_id: str, prompt_kind: str, policy_id: str, sample_idx: int) -> str:
    """The join key of every later stage."""
    return hashlib.sha256(f"{problem_id}|{prompt_kind}|{policy_id}|{sample_idx}".encode()).hexdigest()[:20]


def select_problems(curate: StageOutput, split: str, levels: list[str] | None, max_problems: int | None) -> list[dict]:
    """The problems of ``split`` (or all) with ``levels`` (or any), by `problem_id`, at most
    ``max_problems``: a polars query over the problems files; only the selected rows become dicts."""
    import polars as pl

    lf = curate.scan("problems")
    if split != "all":
        lf = lf.filter(pl.col("split") == split)
    if levels:
        lf = lf.filter(pl.col("level").is_in(levels))
    lf = lf.sort("problem_id")
    return lf.head(max_problems).collect().to_arrow().to_pylist() if max_problems else lf.collect().to_arrow().to_pylist()


def sample_rows(problems: list[dict], samples, prompts: list[str], policy_id: str, temperature: float, prompt_kind: str = "plain",
                guidance: list[str | None] | None = None, loss_prompts: list[str] | None = None) -> list[dict]:
    """Rollout rows for generated samples: answers checked, ids assigned."""
    rows = []
    for i, (problem, group) in enumerate(zip(problems, samples)):
        for j, s in enumerate(group):
            extracted, correct = (None, False) if s.finish_reason == "error" else check(s.text, problem)
            rows.append({
                "sample_id": sample_id(problem["problem_id"], prompt_kind, policy_id, j),
                "problem_id": problem["problem_id"],
                "sample_idx": j,
                "prompt": prompts[i],
                "completion": s.text,
                "completion_token_ids": s.token_ids,
                "behaviour_logprobs": s.logprobs,
                "temperature": float(temperature),
                "finish_reason": s.finish_reason,
                "extracted_answer": extracted,
                "correct": bool(correct),
                "policy_id": policy_id,
                "prompt_kind": prompt_kind,
                "guidance": guidance[i] if guidance else None,
                "loss_prompt": loss_prompts[i] if loss_prompts else prompts[i],
                "loss_logprobs": s.logprobs if prompt_kind == "plain" else None,
                "level": problem.get("level"),
                "error": s.error,
            })
    return rows


def add_loss_logprobs(backend: GenerationBackend, rows: list[dict], temperature: float) -> str | None:
    """Fill ``loss_logprobs`` of guided rows: their tokens under the guidance-free
    ``loss_prompt``, from a forward pass. A backend that cannot score leaves them null
    (the policy update recomputes them); returns why, and logs it, instead of skipping silently."""
    if not rows:
        return None
    try:
        scored = backend.score([r["loss_prompt"] for r in rows], [r["completion_token_ids"] for r in rows], temperature)
    except ScoringUnavailable as exc:
        log.warning("%s: %d rows left without loss_logprobs (the update computes them): %s", backend.name, len(rows), exc)
        return str(exc)
    for r, lp in zip(rows, scored):
        r["loss_logprobs"] = lp
    return None


def scoring_summary(shard_plan) -> dict:
    """The shards' scoring, for a guidance stage's summary: rows left unscored and why (null: all scored)."""
    reasons = sorted({m["scoring_unavailable"] for m in shard_plan.metas() if m.get("scoring_unavailable")})
    return {"unscored": int(shard_plan.total("unscored")), "scoring_unavailable": "; ".join(reasons) or None}


def unscored_note(summary: dict) -> str:
    """What a guidance stage's one-line description adds when some rows could not be scored."""
    return f"; {summary['unscored']} rows unscored ({summary.get('scoring_unavailable')})" if summary.get("unscored") else ""


def summarize(table: pa.Table, seconds: float | None = None) -> dict:
    groups: dict[str, tuple[str | None, list[bool]]] = {}
    for pid, level, correct in zip(table.column("problem_id").to_pylist(), table.column("level").to_pylist(), table.column("correct").to_pylist()):
        groups.setdefault(pid, (level, []))[1].append(correct)
    reasons = table.column("finish_reason").to_pylist()
    summary = {
        "samples": table.num_rows,
        "problems": len(groups),
        "pass": pass_table(groups),
        "finish_reasons": {r: reasons.count(r) for r in sorted(set(reasons))},
        "all_fail_problems": sum(not any(c) for _, c in groups.values()),
    }
    if seconds is not None:
        summary["generation_seconds"] = round(seconds, 2)
    return summary


def preflight(config) -> None:
    """Before any work: the policy can be loaded."""
    check_policy(config)


def settings(config) -> dict:
    policy = config.policy.model_dump(mode="json", include={"model", "backend", "engine"})
    return {"rollouts": config.rollouts.model_dump(mode="json"), "policy": policy, **precision_settings(config)}


def inputs(config, upstream: dict[str, StageOutput]) -> dict:
    template = load_template(config.template_path("plain"))
    return {
        "problems": upstream["curate"].fingerprints["problems"],
        "policy": policy_id_for(config),
        "prompt:plain": "sha256:" + sha256_bytes(template.template.encode()),
    }


def plan(job: Job) -> ShardPlan:
    """The selected problems, by `problem_id`, in shards of `rollouts.shard_size`."""
    rc = job.config.rollouts
    problems = select_problems(job.upstream["curate"], rc.split, rc.levels, rc.max_problems)
    if not problems:
        raise ValueError(f"rollouts: no problems in split {rc.split!r} with levels {rc.levels} in {job.upstream['curate'].path}")
    return make_plan(job, problems, rc.shard_size)


def run_shard(config, shard_plan: ShardPlan, i: int) -> dict:
    """Sample and check shard ``i`` (seed `rollouts.seed + i`) and write it; its generation time."""
    rc = config.rollouts
    backend = shared_backend(config)
    tokenizer = chat_tokenizer(config, backend)
    template = load_template(config.template_path("plain"))
    shard = shard_plan.shards[i]
    prompts = [render(tokenizer, fill(template, p["question"])) for p in shard]
    params = SamplingParams(n=rc.samples_per_problem, temperature=rc.temperature, top_p=rc.top_p,
                            max_new_tokens=rc.max_new_tokens, seed=rc.seed + i)
    t0, backoffs = time.time(), getattr(backend, "oom_backoffs", 0)
    samples = backend.generate(prompts, params)
    meta = {"generation_seconds": time.time() - t0, "oom_backoffs": getattr(backend, "oom_backoffs", 0) - backoffs}
    shard_plan.write(i, to_table(sample_rows(shard, samples, prompts, backend.policy_id, rc.temperature), "rollouts", str(shard_plan.path(i))), meta)
    return meta


def assemble(job: Job, shard_plan: ShardPlan) -> StageOutput:
    """The finished shards as the stage output (written atomically); the work directory goes."""
    parts = shard_plan.parts("rollouts")  # the shard files themselves, linked into the output
    counted = shard_plan.columns(parts, ["problem_id", "level", "correct", "finish_reason"])
    summary = summarize(counted, shard_plan.total("generation_seconds"))
    if shard_plan.total("oom_backoffs"):  # batches retried smaller after running out of device memory
        summary["oom_backoffs"] = int(shard_plan.total("oom_backoffs"))
    out = job.write({"rollouts": parts}, summary, dataset_summaries={"rollouts": summary})
    shard_plan.clean()
    log.info("rollouts: %d samples of %d problems, pass@1 %s, %d all-fail -> %s", summary["samples"], summary["problems"],
             {lvl: v["pass@1"] for lvl, v in summary["pass"].items()}, summary["all_fail_problems"], out.path)
    return out


def describe(s: dict) -> str:
    return f"{s.get('samples')} samples of {s.get('problems')} problems; {s.get('all_fail_problems')} problems with every sample wrong"


def read_rollouts(out: StageOutput) -> pa.Table:
    return read_dataset(out.dataset_path("rollouts"))
