"""What the guidance stages (`explain`, `hint`, `prefix`, `self_hint`) share: what their key depends on,
the current policy's plain rollouts grouped by problem, the problems `filter`
kept (the ones guidance works on), the sampling of a shard of guided prompts,
and the "unlocked" counts of their summaries. Not a stage (its name starts with
an underscore)."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import TYPE_CHECKING, Callable

from tasks.core import reuse
from tasks.core.schemas import to_table
from tasks.core.shards import ShardPlan, generation_meta, group_tokens_from
from tasks.core.store import StageOutput, sha256_bytes
from tasks.models.generation import GenerationBackend, SamplingParams
from tasks.models.policy import chat_tokenizer, policy_id_for, policy_key, precision_settings, render, server_summary, shared_backend
from tasks.models.prompts import fill, load_template
from tasks.models.sampling import sample_seeds
from tasks.stages.rollouts import add_behaviour_logprobs, add_loss_logprobs, sample_rows, scoring_summary, served_summary

if TYPE_CHECKING:
    from tasks.core.stage import Stage
    from tasks.registry import Config

#: what a guidance stage reads
UPSTREAM = ("curate", "rollouts", "filter")


def settings(stage: str, config: Config) -> dict:
    """A guidance stage's own section and the sampling settings of the rollouts it builds on."""
    policy = config.policy.model_dump(mode="json", include={"model", "backend", "engine"})
    return {stage: getattr(config, stage).model_dump(mode="json"), "rollouts": config.rollouts.model_dump(mode="json"), "policy": policy,
            **precision_settings(config)}


def inputs(stage: str, config: Config, upstream: dict[str, StageOutput]) -> dict:
    """Problems, rollouts, the problems `filter` kept, the policy and the stage's template (`prompts.<stage>`)."""
    template = load_template(config.template_path(stage))
    return {
        "problems": upstream["curate"].fingerprints["problems"],
        "rollouts": upstream["rollouts"].fingerprints["rollouts"],
        "filtered": upstream["filter"].fingerprints["problems"],
        "policy": policy_id_for(config),
        f"prompt:{stage}": "sha256:" + sha256_bytes(template.template.encode()),
    }


def key_functions(stage: str):
    """A guidance stage's `settings(config)` and `inputs(config, upstream)` (tasks/core/stage.py)."""
    return (lambda config: settings(stage, config)), (lambda config, upstream: inputs(stage, config, upstream))


#: what planning reads of each plain rollout (the wrong answers, the original prompt): no token lists, no texts
GROUP_COLUMNS = ["problem_id", "sample_idx", "finish_reason", "correct", "extracted_answer", "loss_prompt"]


def load_groups(stage: str, config: Config, upstream: dict[str, StageOutput], only_kept: bool = True
                ) -> tuple[dict[str, dict], dict[str, list[dict]], list[str]]:
    """(problems by id, plain rollout rows by problem, the problems `filter` kept — by
    default the stuck ones, every sample wrong). With ``only_kept`` (what both guidance
    stages need unless `explain.problems: all`) only the kept problems' rows are read: the
    rollouts are scanned and filtered by problem before any row becomes a Python object, and
    only ``GROUP_COLUMNS`` are read.
    The rollouts must come from the configured policy: guidance is built from, and sampled
    by, the current policy."""
    import polars as pl

    kept = sorted(upstream["filter"].read("problems").column("problem_id").to_pylist())

    def scan(out: StageOutput, name: str) -> pl.LazyFrame:
        lf = out.scan(name)
        return lf.filter(pl.col("problem_id").is_in(kept)) if only_kept else lf

    seen = set(upstream["rollouts"].scan("rollouts").select(pl.col("policy_id").unique()).collect().to_series().to_list())
    policy_id = policy_id_for(config)
    if seen and seen != {policy_id}:
        raise ValueError(f"{stage}: the rollouts were sampled by {sorted(seen)}, the configured policy is {policy_id}; "
                         "guidance must come from the current policy")
    problems = {p["problem_id"]: p for p in scan(upstream["curate"], "problems").collect().to_arrow().to_pylist()}
    by_problem: dict[str, list[dict]] = defaultdict(list)
    rows = scan(upstream["rollouts"], "rollouts").select(GROUP_COLUMNS).collect().to_arrow().to_pylist()
    for r in rows:  # in file order, as written
        by_problem[r["problem_id"]].append(r)
    return problems, by_problem, kept


def sampling_params(section, config: Config) -> SamplingParams:
    """A guided pass samples like the rollouts unless its config section says otherwise (its own `seed`)."""
    rc = config.rollouts
    return SamplingParams(
        n=getattr(section, "samples_per_problem", None) or rc.samples_per_problem,
        temperature=rc.temperature if section.temperature is None else section.temperature,
        top_p=rc.top_p,
        max_new_tokens=section.max_new_tokens or rc.max_new_tokens,
        seed=section.seed,
    )


#: the template placeholder that shows a guidance stage's `guidance` (the answer, the hint, the reference's first steps)
PLACEHOLDER = {"explain": "answer", "hint": "hint", "prefix": "hint", "self_hint": "hint"}

#: a guidance stage's processing of its sampled rows: (backend, rows, params) -> (the rows kept, why they could not
#: be scored or None, extra counts by problem_id)
Process = Callable[[GenerationBackend, list[dict], SamplingParams], tuple[list[dict], "str | None", dict[str, dict]]]


def run_guided_shard(stage: Stage, section, config: Config, shard_plan: ShardPlan, i: int, schema: str, process: Process,
                     items: list[dict] | None = None, extra_meta: dict | None = None, **key_settings) -> dict:
    """Shard ``i`` of a guidance stage (``items``: its items as the stage completed them, else the plan's). Each item:
    `problem`, `guidance` (shown through the stage's template, or the prompt template named by `template`; with
    `response_start`, that text begins the answer: the policy continues it) and `loss_prompt` (the original prompt,
    for the loss side; None: the guided prompt itself — an on-policy sample of the prompt it was shown). Sample j of
    a problem is drawn with the seed of
    (`<stage>.seed`, `problem_id`, j, the stage's prompt kind); a problem whose rows an earlier output holds is
    copied (tasks/core/reuse.py; ``key_settings``: the stage's settings that change its kept rows), the others
    are sampled, checked and handed to ``process``; the shard is written with per-problem counts (``sampled``,
    ``unscored``, ``tokens_from``, and what ``process`` adds) and the shard's ``extra_meta``."""
    items = shard_plan.shards[i] if items is None else items
    backend = shared_backend(config)
    tokenizer = chat_tokenizer(config, backend)
    templates = {name: load_template(config.template_path(name)) for name in {it.get("template", stage.name) for it in items}}
    problems = [it["problem"] for it in items]
    prompts = [render(tokenizer, fill(templates[it.get("template", stage.name)], it["problem"]["question"],
                                      **{PLACEHOLDER[stage.name]: it["guidance"]})) + it.get("response_start", "") for it in items]
    items = [{**it, "loss_prompt": prompt if it["loss_prompt"] is None else it["loss_prompt"]} for it, prompt in zip(items, prompts)]
    params = sampling_params(section, config)
    seeds = [sample_seeds(section.seed, p["problem_id"], params.n, stage.name) for p in problems]
    keys = [reuse.key_for(stage, policy_key(config, backend), params, s, prompt, it["problem"], guidance=it["guidance"],
                          loss_prompt=it["loss_prompt"], settings=key_settings) for it, s, prompt in zip(items, seeds, prompts)]

    def sample(todo: list[int]) -> reuse.Sampled:
        t0 = time.time()
        samples = backend.generate([prompts[k] for k in todo], params, [seeds[k] for k in todo])
        meta = {"generation_seconds": time.time() - t0, **generation_meta(samples), "server": server_summary(config)}
        rows = sample_rows([problems[k] for k in todo], samples, [prompts[k] for k in todo], backend.policy_id, params.temperature,
                           prompt_kind=stage.name, guidance=[items[k]["guidance"] for k in todo],
                           loss_prompts=[items[k]["loss_prompt"] for k in todo])
        kept, why, extra = process(backend, rows, params)
        by_problem: dict[str, list[dict]] = defaultdict(list)
        for r in kept:
            by_problem[r["problem_id"]].append(r)
        pids = [problems[k]["problem_id"] for k in todo]
        counts = [{"sampled": len(g), "unscored": len(by_problem[pid]) if why else 0, "scoring_unavailable": why,
                   "tokens_from": group_tokens_from(g), **extra.get(pid, {})} for pid, g in zip(pids, samples)]
        return reuse.Sampled([by_problem[pid] for pid in pids], counts, [all(x.finish_reason != "error" for x in g) for g in samples],
                             meta)

    return reuse.run_shard(shard_plan, i, keys, [p["problem_id"] for p in problems], sample,
                           lambda rows: to_table(rows, schema, str(shard_plan.path(i))), config.policy.max_error_fraction, extra_meta)


def unlocked_summary(stuck: list[str], unlocked: list[str], levels: dict[str, str | None]) -> dict:
    """How many stuck problems a guidance method turned into a verified positive sample
    (``levels``: each stuck problem's level)."""
    unlocked = sorted(set(unlocked) & set(stuck))
    names = sorted({str(levels[pid]) for pid in stuck})
    return {
        "stuck_problems": len(stuck),
        "unlocked_problems": len(unlocked),
        "unlocked_fraction": round(len(unlocked) / len(stuck), 4) if stuck else 0.0,
        "unlocked_by_level": {lvl: sum(str(levels[p]) == lvl for p in unlocked) for lvl in names},
        "stuck_by_level": {lvl: sum(str(levels[p]) == lvl for p in stuck) for lvl in names},
    }


def process_by_loss(loss: str) -> Process:
    """What a guidance stage whose samples train by ``loss`` keeps of them (prefix, self_hint): ``guided`` — every
    generated sample, right or wrong (a group of its own, on-policy under the prompt it was shown: its behaviour
    log-probs are what the loss needs); ``plain`` — the right ones, also scored under the original prompt
    (``loss_logprobs``), for LTE's replacement with the shaped ratio."""

    def process(backend, rows: list[dict], params: SamplingParams) -> tuple[list[dict], str | None, dict]:
        if loss == "guided":
            rows = [r for r in rows if r["finish_reason"] != "error"]
            return rows, add_behaviour_logprobs(backend, rows, params.temperature), {}
        kept = [r for r in rows if r["correct"]]
        why = add_loss_logprobs(backend, kept, params.temperature)  # the same tokens under the original prompt
        return kept, add_behaviour_logprobs(backend, kept, params.temperature) or why, {}

    return process


def assemble_samples(job, shard_plan: ShardPlan, dataset: str, summary: dict) -> tuple[StageOutput, dict]:
    """A sample-keeping guidance stage's output (prefix, self_hint): the shards' kept rows as ``dataset``, its
    ``summary`` with the counts they share (sampled, kept, right, the stuck problems unlocked by a right sample,
    scoring, errors, server, reuse). Returns the output and the summary."""
    parts = shard_plan.parts("rollouts")
    kept = shard_plan.columns(parts, ["problem_id", "correct"]).to_pylist()
    right = [r["problem_id"] for r in kept if r["correct"]]
    summary = {
        **summary,
        "sampled": int(shard_plan.total("sampled")),
        "kept": len(kept),
        "right": len(right),
        **unlocked_summary(shard_plan.context["stuck"], right, shard_plan.context["levels"]),
        **scoring_summary(shard_plan),
        "errors": int(shard_plan.total("errored_samples")),
        **served_summary(shard_plan),
        **reuse.reuse_summary(shard_plan),
    }
    out = reuse.write_output(job, shard_plan, {dataset: parts}, summary, dataset, policy_id_for(job.config),
                             dataset_summaries={dataset: summary})
    shard_plan.clean()
    return out, summary
