"""Stage `hint` (LTE, learning from trial and error): hints from the policy's own mistakes.

Inputs: the curated `problems`, the plain `rollouts` of the current policy, the
problems `filter` kept (the stuck ones), the `hint` prompt template.

Method, only for the problems `filter` kept where every one of the G rollouts failed (in shards of
`hint.shard_size`; sample j of a problem drawn with the seed of (seed, problem_id, j, hint); a problem an
earlier output holds with the same key is copied: tasks/core/reuse.py):
1. collect the distinct wrong extracted answers and whether samples were
   truncated (`finish_reason == 'length'`), and build one of three hints: the
   answers that are wrong; "be concise" (all truncated); both (some truncated);
2. sample G rollouts from the hinted prompt (which tells the policy not to
   mention the hint) and keep the correct ones (optionally rejecting those that
   mention the hint: `hint.leak_check`);
3. for each kept sample record the behaviour log-probabilities under the
   hinted prompt *and* the log-probabilities of the same tokens under the
   original, hint-free prompt (`loss_prompt`, `loss_logprobs`): the loss is
   always computed under the original prompt.

Outputs: dataset `hints` (rollout rows, `prompt_kind = 'hint'`, `guidance` =
the hint shown) and a summary: how many stuck problems got at least one verified
hinted sample, and how many kept samples have every intermediate step right.
"""

from __future__ import annotations

import logging
from collections import Counter

from pydantic import Field

from tasks.core.config import StrictModel
from tasks.core import reuse
from tasks.core.shards import ShardPlan, make_plan
from tasks.core.stage import Job, Stage
from tasks.core.store import StageOutput
from tasks.models.answers import steps_correct
from tasks.models.policy import check_policy, policy_id_for, release_backends
from tasks.models.prompts import hint_text
from tasks.stages import _guidance as guidance
from tasks.stages.rollouts import add_behaviour_logprobs, add_loss_logprobs, scoring_summary, served_note, served_summary, unscored_note


class HintConfig(StrictModel):
    """LTE: re-prompt the stuck problems (those `filter` kept) with a hint built from the policy's own mistakes."""

    samples_per_problem: int | None = Field(None, gt=0, description="hinted samples per stuck problem (default: rollouts.samples_per_problem)")
    temperature: float | None = Field(None, ge=0, description="default: rollouts.temperature")
    max_new_tokens: int | None = Field(None, gt=0, description="default: rollouts.max_new_tokens")
    seed: int = 0
    max_wrong_answers: int | None = Field(None, gt=0, description="at most this many distinct wrong answers in a hint (LTE: all of them)")
    leak_check: bool = Field(False, description="reject hinted samples that mention the hint")
    shard_size: int = Field(32, gt=0, description="problems per shard (the rows do not depend on it); a crash resumes at the first unfinished shard")


STAGE = Stage(name="hint", version="2", module=__name__, upstream=guidance.UPSTREAM, writes={"hints": "rollouts"},
              section="hint", settings_model=HintConfig, sharded=True)

log = logging.getLogger("guidedrl.hint")


def build_hint(rows: list[dict], max_wrong: int | None = None) -> tuple[str, str] | None:
    """(hint, hint kind) for one problem's plain rollouts, or None when LTE does not
    fire: some rollout was correct, or there is no mistake to learn from."""
    usable = [r for r in rows if r["finish_reason"] != "error"]
    if not usable or any(r["correct"] for r in rows):
        return None
    truncated = [r["finish_reason"] == "length" for r in usable]
    wrong = []
    for r in usable:
        a = r["extracted_answer"]
        if r["finish_reason"] != "length" and a and a not in wrong:
            wrong.append(a)
    wrong = wrong[:max_wrong] if max_wrong else wrong
    if all(truncated):
        return hint_text([], True), "concise"
    if any(truncated):
        return hint_text(wrong, True), "both" if wrong else "concise"
    if not wrong:
        return None
    return hint_text(wrong, False), "wrong_answers"


def mentions_hint(completion: str, hint: str) -> bool:
    """The leak check: the completion talks about the hint or repeats it."""
    text = completion.lower()
    return "hint" in text or hint.lower() in text


def preflight(config) -> None:
    """Before any work: the policy can be loaded."""
    check_policy(config)


settings, inputs = guidance.key_functions(STAGE.name)


def plan(job: Job) -> ShardPlan:
    """The stuck problems LTE fires on, each with its hint and original prompt, in shards of `hint.shard_size`."""
    config = job.config
    problems, by_problem, stuck = guidance.load_groups(STAGE.name, config, job.upstream)
    items, kinds = [], Counter()
    for pid in stuck:
        built = build_hint(by_problem[pid], config.hint.max_wrong_answers)
        if built is not None:
            items.append({"problem": problems[pid], "guidance": built[0], "loss_prompt": by_problem[pid][0]["loss_prompt"]})
            kinds[built[1]] += 1
    context = {"stuck": stuck, "levels": {pid: problems[pid]["level"] for pid in stuck}, "hint_kinds": dict(sorted(kinds.items()))}
    return make_plan(job, items, config.hint.shard_size, context)


def run_shard(config, shard_plan: ShardPlan, i: int) -> dict:
    """Shard ``i``'s problems with their hints: their kept samples reused from an earlier output, or sampled and
    verified; written."""
    hc = config.hint

    def process(backend, rows: list[dict], params) -> tuple[list[dict], str | None, dict]:
        kept, leaks = [], Counter()
        for r in rows:
            if not r["correct"]:
                continue
            if hc.leak_check and mentions_hint(r["completion"], r["guidance"]):
                leaks[r["problem_id"]] += 1
                continue
            kept.append(r)
        why = add_loss_logprobs(backend, kept, params.temperature)  # the same tokens under the hint-free prompt
        why = add_behaviour_logprobs(backend, kept, params.temperature) or why  # a text-only server's: the checkpoint's forward pass
        return kept, why, {pid: {"leaks_rejected": n} for pid, n in leaks.items()}

    return guidance.run_guided_shard(STAGE, hc, config, shard_plan, i, "rollouts", process, leak_check=hc.leak_check)


def teardown() -> None:
    """After the shards (tasks/core/shards.py): this process's shared policy backends are freed."""
    release_backends()


def assemble(job: Job, shard_plan: ShardPlan) -> StageOutput:
    """The shards' kept hinted samples as dataset `hints`, with the unlock summary."""
    parts = shard_plan.parts("rollouts")
    kept = shard_plan.columns(parts, ["problem_id", "completion"]).to_pylist()
    stuck = shard_plan.context["stuck"]
    summary = {
        "hinted_problems": sum(map(len, shard_plan.shards)),
        "hint_kinds": shard_plan.context["hint_kinds"],
        "sampled": int(shard_plan.total("sampled")),
        "kept": len(kept),
        "leaks_rejected": int(shard_plan.total("leaks_rejected")),
        **guidance.unlocked_summary(stuck, [r["problem_id"] for r in kept], shard_plan.context["levels"]),
        "kept_with_all_steps_right": sum(steps_correct(r["completion"]) for r in kept),
        **scoring_summary(shard_plan),
        "errors": int(shard_plan.total("errored_samples")),
        **served_summary(shard_plan),
    }
    summary.update(reuse.reuse_summary(shard_plan))
    out = reuse.write_output(job, shard_plan, {"hints": parts}, summary, "hints", policy_id_for(job.config), dataset_summaries={"hints": summary})
    shard_plan.clean()
    log.info("hint: %d of %d stuck problems unlocked by a verified hinted sample (%d kept, %d with every step right) -> %s",
             summary["unlocked_problems"], len(stuck), len(kept), summary["kept_with_all_steps_right"], out.path)
    return out


def describe(s: dict) -> str:
    return (f"LTE unlocked {s.get('unlocked_problems')} of {s.get('stuck_problems')} stuck problems "
            f"({s.get('unlocked_fraction', 0):.1%}) with a verified hinted sample; {s.get('kept')} kept, "
            f"{s.get('kept_with_all_steps_right')} with every step right{unscored_note(s)}{reuse.reuse_note(s)}{served_note(s)}")
