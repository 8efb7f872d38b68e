"""Stage `rollouts`: sample G completions per problem from the policy and check them.

Inputs: the curated `problems` (the configured split and levels), the policy
(a checkpoint or a served model) and the `plain` prompt template.

Method: problems are ordered by `problem_id` and cut into shards of
`shard_size` problems. Sample j of a problem is drawn with its own seed, from
(`seed`, `problem_id`, j) — never from the shard — so the rows are the same for
any shard size, worker count or fan-out; a problem whose rows an earlier output
holds (same policy, prompt, settings and seeds: tasks/core/reuse.py) is copied
from there, not sampled. Each shard is checked answer by answer, and written atomically to
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
from tasks.core import reuse
from tasks.core.shards import ShardPlan, generation_meta, group_tokens_from, make_plan, tokens_from
from tasks.core.stage import Job, Stage
from tasks.core.store import StageOutput, read_dataset, sha256_bytes
from tasks.models.answers import check
from tasks.models.generation import GenerationBackend, SamplingParams, ScoringUnavailable
from tasks.models import served
from tasks.models.policy import chat_tokenizer, check_policy, policy_id_for, policy_key, precision_settings, release_backends, render, server_summary, shared_backend
from tasks.models.prompts import fill, load_template
from tasks.models.sampling import sample_seeds
from tasks.models.token_text import prompt_ids
from tasks.core.metrics import pass_table


class RolloutsConfig(StrictModel):
    samples_per_problem: int = Field(8, gt=0, description="the group size G")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(160, gt=0)
    max_prompt_tokens: int | None = Field(
        None, gt=0, description="problems whose prompt (chat template applied) is longer than this many tokens are left out, "
        "and counted (verl's filter_overlong_prompts; ExpRL 4096); default: no limit")
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
                "token_source": s.token_source,
            })
    return rows


def fill_logprobs(backend: GenerationBackend, rows: list[dict], temperature: float, prompt: str, into: str, otherwise: str
                  ) -> str | None:
    """Set ``into`` of each row to its completion tokens' log-probabilities under its ``prompt`` column (``score``:
    the server's prompt log-probs, else a forward pass of the local checkpoint). A backend that cannot score
    leaves them null; returns why, and logs it with ``otherwise`` (what happens then), instead of skipping silently."""
    if not rows:
        return None
    try:
        scored = backend.score([r[prompt] for r in rows], [r["completion_token_ids"] for r in rows], temperature)
    except ScoringUnavailable as exc:
        log.warning("%s: %d rows left without %s (%s): %s", backend.name, len(rows), into, otherwise, exc)
        return str(exc)
    for r, lp in zip(rows, scored):
        r[into] = lp
    return None


def add_loss_logprobs(backend: GenerationBackend, rows: list[dict], temperature: float) -> str | None:
    """Fill ``loss_logprobs`` of guided rows: their tokens under the guidance-free ``loss_prompt``."""
    return fill_logprobs(backend, rows, temperature, "loss_prompt", "loss_logprobs", "the update computes them")


def add_behaviour_logprobs(backend: GenerationBackend, rows: list[dict], temperature: float) -> str | None:
    """Fill ``behaviour_logprobs`` of rows whose sampler gave none (a text-only server): their tokens under the
    prompt they were sampled with, from the sampling checkpoint — what LTE's shaped ratio divides by."""
    todo = [r for r in rows if r["behaviour_logprobs"] is None and r["completion_token_ids"]]
    return fill_logprobs(backend, todo, temperature, "prompt", "behaviour_logprobs", "the update masks guided rows without them")


def scoring_summary(shard_plan) -> dict:
    """The shards' scoring, for a guidance stage's summary: rows left unscored and why (null: all scored)."""
    reasons = sorted({m["scoring_unavailable"] for m in shard_plan.metas() if m.get("scoring_unavailable")})
    return {"unscored": int(shard_plan.total("unscored")), "scoring_unavailable": "; ".join(reasons) or None}


def unscored_note(summary: dict) -> str:
    """What a guidance stage's one-line description adds when some rows could not be scored."""
    return f"; {summary['unscored']} rows unscored ({summary.get('scoring_unavailable')})" if summary.get("unscored") else ""


def summarize(table: pa.Table, seconds: float | None = None) -> dict:
    """Counts and pass@k by level. A failed generation (finish_reason ``error``) is no sample: it is left out of
    pass@k and of the all-fail count and counted apart (``errors``, and per level in the pass table)."""
    groups: dict[str, tuple[str | None, list[bool]]] = {}
    errors: dict[str, int] = {}
    rows = zip(table.column("problem_id").to_pylist(), table.column("level").to_pylist(), table.column("correct").to_pylist(),
               table.column("finish_reason").to_pylist())
    for pid, level, correct, reason in rows:
        group = groups.setdefault(pid, (level, []))
        if reason == "error":
            errors[str(level)] = errors.get(str(level), 0) + 1
        else:
            group[1].append(correct)
    reasons = table.column("finish_reason").to_pylist()
    generated = {pid: g for pid, g in groups.items() if g[1]}
    passes = pass_table(generated) if generated else {}
    for level, entry in passes.items():
        entry["errors"] = sum(errors.values()) if level == "all" else errors.get(level, 0)
    summary = {
        "samples": table.num_rows,
        "problems": len(groups),
        "pass": passes,
        "finish_reasons": {r: reasons.count(r) for r in sorted(set(reasons))},
        "errors": sum(errors.values()),
        "all_fail_problems": sum(not any(c) for _, c in generated.values()),
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
    """Shard ``i``: each problem's G samples (seeds from `rollouts.seed`, its `problem_id` and the sample's index) —
    copied from an earlier output that holds them (tasks/core/reuse.py), else sampled and checked — written."""
    rc = config.rollouts
    backend = shared_backend(config)
    tokenizer = chat_tokenizer(config, backend)
    template = load_template(config.template_path("plain"))
    shard = shard_plan.shards[i]
    prompts = [render(tokenizer, fill(template, p["question"])) for p in shard]
    shard, prompts, too_long = within_prompt_limit(shard, prompts, tokenizer, rc.max_prompt_tokens)
    params = SamplingParams(n=rc.samples_per_problem, temperature=rc.temperature, top_p=rc.top_p,
                            max_new_tokens=rc.max_new_tokens, seed=rc.seed)
    seeds = [sample_seeds(rc.seed, p["problem_id"], rc.samples_per_problem, "plain") for p in shard]
    keys = [reuse.key_for(STAGE, policy_key(config, backend), params, s, prompt, p) for p, s, prompt in zip(shard, seeds, prompts)]

    def sample(todo: list[int]) -> reuse.Sampled:
        t0, backoffs = time.time(), getattr(backend, "oom_backoffs", 0)
        samples = backend.generate([prompts[k] for k in todo], params, [seeds[k] for k in todo])
        meta = {"generation_seconds": time.time() - t0, "oom_backoffs": getattr(backend, "oom_backoffs", 0) - backoffs,
                **generation_meta(samples), "server": server_summary(config)}
        rows = [sample_rows([shard[k]], [group], [prompts[k]], backend.policy_id, rc.temperature) for k, group in zip(todo, samples)]
        return reuse.Sampled(rows, [{"tokens_from": group_tokens_from(g)} for g in samples],
                             [all(x.finish_reason != "error" for x in g) for g in samples], meta)

    return reuse.run_shard(shard_plan, i, keys, [p["problem_id"] for p in shard], sample,
                           lambda rows: to_table(rows, "rollouts", str(shard_plan.path(i))), config.policy.max_error_fraction,
                           {"prompts_over_max": too_long} if too_long else None)


def within_prompt_limit(problems: list[dict], prompts: list[str], tokenizer, max_prompt_tokens: int | None
                        ) -> tuple[list[dict], list[str], int]:
    """The problems (and their prompts) whose prompt has at most ``max_prompt_tokens`` tokens, and how many were
    left out. Without a limit, or without a tokenizer to count with (warned), all of them."""
    if not max_prompt_tokens:
        return problems, prompts, 0
    if tokenizer is None:
        log.warning("rollouts.max_prompt_tokens = %d: no tokenizer to count prompt tokens with; no prompt is left out "
                    "(set policy.tokenizer)", max_prompt_tokens)
        return problems, prompts, 0
    lengths = [len(prompt_ids(tokenizer, p)) for p in prompts]
    keep = [k for k, n in enumerate(lengths) if n <= max_prompt_tokens]
    return [problems[k] for k in keep], [prompts[k] for k in keep], len(prompts) - len(keep)


def teardown() -> None:
    """After the shards (tasks/core/shards.py): this process's shared policy backends are freed."""
    release_backends()


def assemble(job: Job, shard_plan: ShardPlan) -> StageOutput:
    """The finished shards as the stage output (written atomically); the work directory goes."""
    parts = shard_plan.parts("rollouts")  # the shard files themselves, linked into the output
    counted = shard_plan.columns(parts, ["problem_id", "level", "correct", "finish_reason"])
    summary = summarize(counted, shard_plan.total("generation_seconds"))
    summary.update(served_summary(shard_plan))
    if shard_plan.total("oom_backoffs"):  # batches retried smaller after running out of device memory
        summary["oom_backoffs"] = int(shard_plan.total("oom_backoffs"))
    if shard_plan.total("prompts_over_max"):  # problems left out: their prompt is over rollouts.max_prompt_tokens
        summary["prompts_over_max"] = int(shard_plan.total("prompts_over_max"))
    summary.update(reuse.reuse_summary(shard_plan))
    out = reuse.write_output(job, shard_plan, {"rollouts": parts}, summary, "rollouts", policy_id_for(job.config), dataset_summaries={"rollouts": summary})
    shard_plan.clean()
    log.info("rollouts: %d samples of %d problems, pass@1 %s, %d all-fail -> %s", summary["samples"], summary["problems"],
             {lvl: v["pass@1"] for lvl, v in summary["pass"].items()}, summary["all_fail_problems"], out.path)
    return out


def served_summary(shard_plan: ShardPlan) -> dict:
    """What the server gave and guidedrl computed (``server``), and where the samples' token ids came from."""
    server = next((m["server"] for m in shard_plan.metas() if m.get("server")), None)
    return {**({"server": server} if server else {}), "tokens_from": tokens_from(shard_plan)}


def served_note(s: dict) -> str:
    """What a sampling stage's one-line description adds: failed generations, re-tokenized rows, the server."""
    notes = []
    if s.get("errors"):
        notes.append(f"{s['errors']} failed generations (counted apart)")
    mismatch = (s.get("tokens_from") or {}).get("mismatch")
    if mismatch:
        notes.append(f"{mismatch} re-tokenized completions did not decode back to their text (no token ids: not trained on)")
    if s.get("server") and s["server"].get("computed"):
        notes.append(served.describe(s["server"]))
    return "".join(f"; {n}" for n in notes)


def describe(s: dict) -> str:
    over = f"; {s['prompts_over_max']} problems left out (prompt over rollouts.max_prompt_tokens)" if s.get("prompts_over_max") else ""
    return (f"{s.get('samples')} samples of {s.get('problems')} problems; {s.get('all_fail_problems')} problems with every sample "
            f"wrong{over}{reuse.reuse_note(s)}{served_note(s)}")


def read_rollouts(out: StageOutput) -> pa.Table:
    return read_dataset(out.dataset_path("rollouts"))
