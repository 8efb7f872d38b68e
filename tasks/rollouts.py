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
import json
import logging
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa

from tasks.answers import check
from tasks.config import Config
from tasks.generation import GenerationBackend, SamplingParams, checkpoint_fingerprint, make_backend
from tasks.metrics import pass_table
from tasks.prompts import chat, fill, load_template
from tasks.schemas import to_table
from tasks.shards import ShardPlan, make_plan, run_stage
from tasks.store import Store, StageOutput, read_dataset, sha256_bytes, stage_key

STAGE = "rollouts"
STAGE_VERSION = "1"

log = logging.getLogger("guidedrl.rollouts")


def sample_id(problem_id: str, prompt_kind: str, policy_id: str, sample_idx: int) -> str:
    """The join key of every later stage."""
    return hashlib.sha256(f"{problem_id}|{prompt_kind}|{policy_id}|{sample_idx}".encode()).hexdigest()[:20]


def policy_id_for(config: Config) -> str:
    p = config.policy
    if p.backend == "openai":
        return p.policy_id or f"openai:{p.model}"
    path = config.resolve(p.model)
    if path.is_dir():
        return checkpoint_fingerprint(path)
    if p.backend == "vllm":
        return p.policy_id or f"vllm:{p.model}"
    raise FileNotFoundError(f"{path}: policy checkpoint not found (policy.model)")


def local_policy_dir(config: Config, stage: str) -> Path:
    """The policy checkpoint directory a training stage starts from (it must be a local transformers model)."""
    base = config.resolve(config.policy.model)
    if config.policy.backend != "transformers" or not base.is_dir():
        raise ValueError(f"{stage}: trains a local checkpoint; policy.model ({config.policy.model}) must be a model directory "
                         "with policy.backend transformers")
    return base


def open_backend(config: Config) -> GenerationBackend:
    p = config.policy
    if p.backend == "transformers":
        return make_backend("transformers", str(config.resolve(p.model)), batch_size=p.batch_size)
    if p.backend == "openai":
        return make_backend("openai", p.model, base_url=p.base_url, api_key_env=p.api_key_env, concurrency=p.concurrency,
                            timeout=p.timeout_seconds, max_retries=p.max_retries, policy_id=policy_id_for(config))
    return make_backend("vllm", str(config.resolve(p.model)) if config.resolve(p.model).is_dir() else p.model, **p.engine)


def chat_tokenizer(config: Config, backend: GenerationBackend):
    """The tokenizer whose chat template wraps prompts (None: prompts go unwrapped)."""
    if getattr(backend, "tokenizer", None) is not None:
        return backend.tokenizer
    path = config.resolve(config.policy.tokenizer or config.policy.model)
    if path.is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path))
    log.warning("no local tokenizer for %s: prompts are sent without a chat template (set policy.tokenizer)", config.policy.model)
    return None


def select_problems(problems: pa.Table, split: str, levels: list[str] | None, max_problems: int | None) -> list[dict]:
    rows = problems.to_pylist()
    if split != "all":
        rows = [r for r in rows if r["split"] == split]
    if levels:
        rows = [r for r in rows if r["level"] in levels]
    rows.sort(key=lambda r: r["problem_id"])
    return rows[:max_problems] if max_problems else rows


def sample_rows(problems: list[dict], samples, prompts: list[str], policy_id: str, prompt_kind: str = "plain",
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


def render(tokenizer, user_turn: str) -> str:
    """A user turn wrapped in the policy's chat template (unwrapped without a tokenizer)."""
    return chat(tokenizer, user_turn) if tokenizer is not None else user_turn


def add_loss_logprobs(backend: GenerationBackend, rows: list[dict], temperature: float) -> None:
    """Fill ``loss_logprobs`` of guided rows: their tokens under the guidance-free
    ``loss_prompt``, from a forward pass. Backends that cannot score leave them
    null (the policy update recomputes them)."""
    if rows and hasattr(backend, "score"):
        scored = backend.score([r["loss_prompt"] for r in rows], [r["completion_token_ids"] for r in rows], temperature)
        for r, lp in zip(rows, scored):
            r["loss_logprobs"] = lp


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


def key_for(config: Config, upstream: dict[str, StageOutput]) -> tuple[str, dict, dict]:
    stage_cfg = config.stage_config(STAGE)
    template = load_template(config.template_path("plain"))
    inputs = {
        "problems": upstream["curate"].fingerprints["problems"],
        "policy": policy_id_for(config),
        "prompt:plain": "sha256:" + sha256_bytes(template.template.encode()),
    }
    return stage_key(STAGE, stage_cfg, inputs, STAGE_VERSION), stage_cfg, inputs


def plan(config: Config, store: Store, upstream: dict[str, StageOutput]) -> ShardPlan:
    """The selected problems, by `problem_id`, in shards of `rollouts.shard_size`."""
    rc = config.rollouts
    problems = select_problems(upstream["curate"].read("problems"), rc.split, rc.levels, rc.max_problems)
    if not problems:
        raise ValueError(f"rollouts: no problems in split {rc.split!r} with levels {rc.levels} in {upstream['curate'].path}")
    return make_plan(STAGE, store, key_for(config, upstream), problems, rc.shard_size)


_BACKENDS: dict[str, GenerationBackend] = {}
_BACKENDS_LOCK = threading.Lock()


def shared_backend(config: Config) -> GenerationBackend:
    """One backend per process and policy config: the shards of a stage (in a loop,
    on threads or on one Ray worker) load the model once."""
    key = json.dumps(config.policy.model_dump(mode="json"), sort_keys=True) + str(config.resolve(config.policy.model))
    with _BACKENDS_LOCK:
        if key not in _BACKENDS:
            _BACKENDS[key] = open_backend(config)
        return _BACKENDS[key]


def release_backends() -> None:
    """Forget this process's shared backends (a stage is done with them)."""
    with _BACKENDS_LOCK:
        _BACKENDS.clear()


def run_shard(config: Config, shard_plan: ShardPlan, i: int) -> dict:
    """Sample and check shard ``i`` (seed `rollouts.seed + i`) and write it; its generation time."""
    rc = config.rollouts
    backend = shared_backend(config)
    tokenizer = chat_tokenizer(config, backend)
    template = load_template(config.template_path("plain"))
    shard = shard_plan.shards[i]
    prompts = [render(tokenizer, fill(template, p["question"])) for p in shard]
    params = SamplingParams(n=rc.samples_per_problem, temperature=rc.temperature, top_p=rc.top_p,
                            max_new_tokens=rc.max_new_tokens, seed=rc.seed + i)
    t0 = time.time()
    samples = backend.generate(prompts, params)
    meta = {"generation_seconds": time.time() - t0}
    shard_plan.write(i, to_table(sample_rows(shard, samples, prompts, backend.policy_id), STAGE, str(shard_plan.path(i))), meta)
    return meta


def assemble(store: Store, shard_plan: ShardPlan, force: bool = False) -> StageOutput:
    """The finished shards as the stage output (written atomically); the work directory goes."""
    parts = shard_plan.tables("rollouts")
    summary = summarize(pa.concat_tables(parts), shard_plan.total("generation_seconds"))
    out = store.write(STAGE, shard_plan.key, {"rollouts": ("rollouts", parts)}, config=shard_plan.stage_cfg,
                      inputs=shard_plan.inputs, stage_version=STAGE_VERSION, summary=summary, replace=force,
                      dataset_summaries={"rollouts": summary})
    shard_plan.clean()
    log.info("rollouts: %d samples of %d problems, pass@1 %s, %d all-fail -> %s", summary["samples"], summary["problems"],
             {lvl: v["pass@1"] for lvl, v in summary["pass"].items()}, summary["all_fail_problems"], out.path)
    return out


def run(config: Config, store: Store, upstream: dict[str, StageOutput], force: bool = False) -> tuple[StageOutput, bool]:
    return run_stage(sys.modules[__name__], config, store, upstream, force,
                     describe=f"rollouts: {config.rollouts.samples_per_problem} samples per problem")


def read_rollouts(out: StageOutput) -> pa.Table:
    return read_dataset(out.dataset_path("rollouts"))
