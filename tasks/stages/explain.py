"""Stage `explain` (ExPO, self-explanation): the policy explains how to reach the
ground-truth answer it is shown.

Inputs: the curated `problems`, the plain `rollouts` of the current policy, the
problems `filter` kept (the stuck ones), the `explain` prompt template (question +
answer, "explain step by step").

Method:
1. targets: the problems `filter` kept — by default those whose rollouts all failed (`explain.problems: stuck`),
   or every rolled-out problem (`all`), in shards of `explain.shard_size`
   (sample j of a problem drawn with the seed of (seed, problem_id, j, explain); a problem an earlier
   output holds with the same key is copied from there: tasks/core/reuse.py);
2. sample m explanations from the answer-conditioned prompt; keep those whose
   final answer checks correct;
3. score each kept explanation on the two properties that make a useful
   positive sample (both under the policy at temperature 1, both under the
   *original* prompt, which never shows the answer):
   (a) `explain_loglik` = log pi(explanation | original prompt) per token
       (`explain_loglik_total`: summed) — likely under the current policy;
   (b) `explain_answer_gain` = log pi(\\boxed{answer} | original prompt +
       explanation body) - log pi(\\boxed{answer} | original prompt) — how much
       the explanation raises the probability of the right answer;
4. per problem, mark the explanation chosen by `explain.select` (highest (a),
   highest (b), or all).

Outputs: dataset `explanations` (rollout rows with `prompt_kind = 'explain'`,
`guidance` = the answer shown, `loss_prompt` = the original prompt,
`loss_logprobs` = the tokens under it, plus the scores and `selected`), and a
summary: how many stuck problems got a verified explanation, which did not
(listed), and how many kept explanations have every intermediate step right —
an explanation can copy the answer it was shown.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from typing import Literal

from pydantic import Field

from tasks.core.config import StrictModel
from tasks.core import reuse
from tasks.core.shards import ShardPlan, make_plan
from tasks.core.stage import Job, Stage
from tasks.core.store import StageOutput
from tasks.models.answers import steps_correct
from tasks.models.generation import ScoringUnavailable
from tasks.models.policy import check_policy, policy_id_for, release_backends
from tasks.models.token_text import prompt_ids, suffix_ids, token_spans
from tasks.stages import _guidance as guidance
from tasks.stages.rollouts import add_loss_logprobs, scoring_summary, served_note, served_summary, unscored_note


class ExplainConfig(StrictModel):
    """ExPO: the policy explains how to reach the ground-truth answer it is shown."""

    problems: Literal["stuck", "all"] = Field("stuck", description="stuck: the problems `filter` kept (by default those whose rollouts all failed); all: every rolled-out problem")
    samples_per_problem: int = Field(4, gt=0, description="explanations sampled per problem (m)")
    temperature: float | None = Field(None, ge=0, description="default: rollouts.temperature")
    max_new_tokens: int | None = Field(None, gt=0, description="default: rollouts.max_new_tokens")
    seed: int = 0
    select: Literal["loglik", "answer_gain", "all"] = Field(
        "loglik", description="per problem keep the correct explanation with the highest per-token log-likelihood, the highest answer gain, or all"
    )
    shard_size: int = Field(32, gt=0, description="problems per shard (the rows do not depend on it); a crash resumes at the first unfinished shard")
    leak_check: bool = Field(True, description="flag explanations that lean on having been given the answer (\"as given\", "
                             "\"we are told the answer\") and never select them: the policy never sees the answer at training time")


STAGE = Stage(name="explain", version="2", module=__name__, upstream=guidance.UPSTREAM, writes={"explanations": "explanations"},
              section="explain", settings_model=ExplainConfig, sharded=True)

log = logging.getLogger("guidedrl.explain")


def answer_text(answer: str) -> str:
    """The answer as the policy is asked to end: boxed."""
    return f"\\boxed{{{answer}}}"


def explanation_ids(tokenizer, ids) -> list[int]:
    """The explanation's ids without its final boxed answer: the sampled ids before the first one that adds text at
    or after the last ``\\boxed`` of the decoded completion (all of them where there is none)."""
    text, spans = token_spans(tokenizer, ids)
    cut = text.rfind("\\boxed")
    if cut < 0:
        return [int(t) for t in ids]
    return [int(t) for t in ids[:next(k for k, (_, end) in enumerate(spans) if end > cut)]]


def score_explanations(backend, rows: list[dict], answers: list[str]) -> str | None:
    """Add (a) `explain_loglik`(+`_total`) and (b) `explain_answer_gain` to kept rows; a backend that cannot
    score leaves them null and the reason is returned (and logged)."""
    if not rows:
        return None
    tok = getattr(backend, "tokenizer", None)
    try:
        if tok is None:
            raise ScoringUnavailable("no local tokenizer to encode the answers (set policy.tokenizer or policy.checkpoint)")
        prompts = [r["loss_prompt"] for r in rows]
        lls = backend.score(prompts, [r["completion_token_ids"] for r in rows], 1.0)
        # the answer's ids after the explanation's own sampled ids (its body: the tokens before its last \boxed), and
        # right after the prompt: tokens in context, never the text of prompt + explanation tokenized again
        bodies = [explanation_ids(tok, r["completion_token_ids"]) for r in rows]
        with_ids = [suffix_ids(tok, tok.decode(prompt_ids(tok, p) + b, skip_special_tokens=False), answer_text(a))
                    for p, b, a in zip(prompts, bodies, answers)]
        with_expl = [s[len(b):] for s, b in zip(backend.score(prompts, [b + w for b, w in zip(bodies, with_ids)], 1.0), bodies)]
        without = backend.score(prompts, [suffix_ids(tok, p, answer_text(a)) for p, a in zip(prompts, answers)], 1.0)
    except ScoringUnavailable as exc:
        log.warning("explain: %d explanations without ExPO's scores (explain_loglik, explain_answer_gain; select falls back "
                    "to the first verified one): %s", len(rows), exc)
        return str(exc)
    for r, ll, w, wo in zip(rows, lls, with_expl, without):
        r["explain_loglik_total"] = float(sum(ll))
        r["explain_loglik"] = float(sum(ll) / max(1, len(ll)))
        r["explain_answer_gain"] = float(sum(w) - sum(wo))
    return None


#: phrases by which an explanation leans on having been shown the answer (explain.leak_check)
LEAK_PHRASES = re.compile(r"\b(as given|given answer|answer (is|was) given|we (are|were) told|as (stated|told)|the answer (provided|shown)|"
                          r"(provided|shown|stated|given) (answer|result)|i was (told|given))\b", re.IGNORECASE)


def leans_on_the_answer(completion: str) -> bool:
    """The leak check: the explanation talks about having been given the answer."""
    return bool(LEAK_PHRASES.search(completion))


def select(rows: list[dict], rule: str) -> None:
    """Mark per problem the explanation(s) chosen by ``rule``; explanations flagged as
    leaning on the shown answer (``leaks_answer``) are never selected."""
    by_problem: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        r["selected"] = rule == "all" and not r.get("leaks_answer")
        if not r.get("leaks_answer"):
            by_problem[r["problem_id"]].append(r)
    if rule == "all":
        return
    field = {"loglik": "explain_loglik", "answer_gain": "explain_answer_gain"}[rule]
    for group in by_problem.values():
        best = max(group, key=lambda r: (r.get(field) is not None, r.get(field) or 0.0, -r["sample_idx"]))
        best["selected"] = True


def preflight(config) -> None:
    """Before any work: the policy can be loaded."""
    check_policy(config)


settings, inputs = guidance.key_functions(STAGE.name)


def plan(job: Job) -> ShardPlan:
    """The target problems (stuck, or all), each with its original prompt, in shards of `explain.shard_size`."""
    config = job.config
    problems, by_problem, stuck = guidance.load_groups(STAGE.name, config, job.upstream, only_kept=config.explain.problems == "stuck")
    targets = stuck if config.explain.problems == "stuck" else sorted(by_problem)
    items = [{"problem": problems[pid], "guidance": problems[pid]["answer"], "loss_prompt": by_problem[pid][0]["loss_prompt"]}
             for pid in targets]
    context = {"stuck": stuck, "levels": {pid: problems[pid]["level"] for pid in stuck}}
    return make_plan(job, items, config.explain.shard_size, context)


def run_shard(config, shard_plan: ShardPlan, i: int) -> dict:
    """Shard ``i``'s problems: their explanations reused from an earlier output, or sampled, verified, scored and
    selected; written."""
    ec = config.explain

    def process(backend, rows: list[dict], params) -> tuple[list[dict], str | None, dict]:
        kept = [r for r in rows if r["correct"]]  # the final answer must verify
        why = add_loss_logprobs(backend, kept, params.temperature)
        why = score_explanations(backend, kept, [r["guidance"] for r in kept]) or why  # the answer it was shown
        for r in kept:
            r["leaks_answer"] = ec.leak_check and leans_on_the_answer(r["completion"])
            r.setdefault("explain_loglik", None)
            r.setdefault("explain_loglik_total", None)
            r.setdefault("explain_answer_gain", None)
        select(kept, ec.select)  # per problem: a shard holds whole problems
        return kept, why, {}

    return guidance.run_guided_shard(STAGE, ec, config, shard_plan, i, "explanations", process, select=ec.select,
                                     leak_check=ec.leak_check)


def teardown() -> None:
    """After the shards (tasks/core/shards.py): this process's shared policy backends are freed."""
    release_backends()


def assemble(job: Job, shard_plan: ShardPlan) -> StageOutput:
    """The shards' kept explanations as dataset `explanations`, with the unlock summary."""
    parts = shard_plan.parts("explanations")
    kept = shard_plan.columns(parts, ["problem_id", "completion", "selected", "leaks_answer"]).to_pylist()
    targets = [it["problem"]["problem_id"] for shard in shard_plan.shards for it in shard]
    stuck = shard_plan.context["stuck"]
    explained = sorted({r["problem_id"] for r in kept if not r["leaks_answer"]})  # a leaning explanation unlocks nothing
    summary = {
        "target_problems": len(targets),
        "sampled": int(shard_plan.total("sampled")),
        "kept": len(kept),
        "leaks_flagged": sum(bool(r["leaks_answer"]) for r in kept),
        "explained_problems": len(explained),
        **guidance.unlocked_summary(stuck, explained, shard_plan.context["levels"]),
        "unexplained_problems": [pid for pid in targets if pid not in set(explained)],
        "kept_with_all_steps_right": sum(steps_correct(r["completion"]) for r in kept),
        "selected_with_all_steps_right": sum(steps_correct(r["completion"]) for r in kept if r["selected"]),
        "select": shard_plan.stage_cfg["explain"]["select"],
        **scoring_summary(shard_plan),
        "errors": int(shard_plan.total("errored_samples")),
        **served_summary(shard_plan),
    }
    summary.update(reuse.reuse_summary(shard_plan))
    out = reuse.write_output(job, shard_plan, {"explanations": parts}, summary, "explanations", policy_id_for(job.config),
                             dataset_summaries={"explanations": summary})
    shard_plan.clean()
    log.info("explain: %d of %d stuck problems got a verified explanation (%d kept, %d with every step right); "
             "%d target problems without one -> %s", summary["unlocked_problems"], len(stuck), len(kept),
             summary["kept_with_all_steps_right"], len(summary["unexplained_problems"]), out.path)
    return out


def describe(s: dict) -> str:
    return (f"ExPO explained {s.get('unlocked_problems')} of {s.get('stuck_problems')} stuck problems "
            f"({s.get('unlocked_fraction', 0):.1%}) with a verified explanation; {s.get('kept')} kept, "
            f"{s.get('kept_with_all_steps_right')} with every step right{unscored_note(s)}{reuse.reuse_note(s)}{served_note(s)}")
