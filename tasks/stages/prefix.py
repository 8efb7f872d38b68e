"""Stage `prefix` (QuestA, POPE, BREAD): the first steps of the reference solution as guidance on stuck problems.

Inputs: the curated `problems` (their `reference_solution`), the plain `rollouts` of the current policy, the problems
`filter` kept (the stuck ones), the `prefix` prompt template.

Method, only for the problems `filter` kept where every one of the G rollouts failed (BREAD branches only there; in
shards of `prefix.shard_size`; sample j of a problem drawn with the seed of (seed, problem_id, j, prefix)):
1. cut the reference solution into steps (its non-blank lines) and take the first ⌊f·n⌋ of n (at least one, never
   all), stopping before the first step that states the answer (`prefix_steps`); f is the round's entry of
   `prefix.fractions` (QuestA: 50 % of the solution, then 25 %). A reference of one step, or whose first step
   states the answer, gives no prefix: the problem is skipped;
2. sample G continuations, the prefix shown either in the question (`form: prompt`, QuestA's and POPE's partial
   solution in the prompt, template `prompts.prefix`) or as the start of the answer (`form: response`, BREAD's
   branch from an expert prefix: the plain prompt, the policy continues the steps);
3. `loss: guided` (what the papers do: the prefix is context, never trained on): every continuation, right and
   wrong, is an on-policy sample of the prompt it was shown (`loss_prompt` = that prompt) and forms a GRPO group of
   its own; `loss: plain` (LTE's and Guide-GRPO's form, from no prefix paper): the right continuations are scored
   under the original prompt (`loss_logprobs`) and replace failed rollouts with the mixed-policy (shaped) ratio,
   as LTE's hinted samples do.

Outputs: dataset `prefixed` (rollout rows, `prompt_kind = 'prefix'`, `guidance` = the prefix shown) and a summary:
the round's fraction, how many stuck problems got a verified continuation, how many kept samples are right.
"""

from __future__ import annotations

import logging
import math
from typing import Annotated, Literal

from pydantic import Field

from tasks.core import reuse
from tasks.core.config import StrictModel
from tasks.core.shards import ShardPlan, make_plan
from tasks.core.stage import Job, Stage
from tasks.core.store import StageOutput, sha256_bytes
from tasks.models.answers import mentions_answer
from tasks.models.policy import check_policy, release_backends
from tasks.models.prompts import load_template
from tasks.stages import _guidance as guidance
from tasks.stages.rollouts import served_note, unscored_note


class PrefixConfig(StrictModel):
    """Reference-prefix guidance: the first steps of the reference solution shown on the stuck problems (those `filter`
    kept), a smaller share each round."""

    fractions: list[Annotated[float, Field(gt=0, le=1)]] = Field([0.5, 0.25], min_length=1, description="the share of the reference's steps shown, by round "
                                   "(round r takes entry r, the last one after; QuestA: 0.5, then 0.25)")
    round: int = Field(1, ge=1, description="the round this is (set by `guidedrl online`): picks the entry of `fractions`")
    form: Literal["prompt", "response"] = Field("prompt", description="prompt: the steps in the question (template "
                                                "prompts.prefix; QuestA, POPE); response: the answer starts with them and "
                                                "the policy continues (BREAD)")
    loss: Literal["guided", "plain"] = Field("guided", description="guided: every continuation trains as an on-policy sample of "
                                             "the prompt it was shown, a group of its own, the prefix never trained on (QuestA, "
                                             "POPE, BREAD); plain: right continuations replace failed rollouts under the "
                                             "original prompt with the shaped ratio (LTE's loss)")
    samples_per_problem: int | None = Field(None, gt=0, description="continuations per stuck problem (default: rollouts.samples_per_problem)")
    temperature: float | None = Field(None, ge=0, description="default: rollouts.temperature")
    max_new_tokens: int | None = Field(None, gt=0, description="default: rollouts.max_new_tokens")
    seed: int = 0
    shard_size: int = Field(32, gt=0, description="problems per shard (the rows do not depend on it); a crash resumes at the first unfinished shard")

    def fraction(self) -> float:
        """This round's share of the reference's steps."""
        return self.fractions[min(self.round, len(self.fractions)) - 1]


STAGE = Stage(name="prefix", version="1", module=__name__, upstream=guidance.UPSTREAM, writes={"prefixed": "rollouts"},
              section="prefix", settings_model=PrefixConfig, sharded=True)

log = logging.getLogger("guidedrl.prefix")


def prefix_steps(reference_solution: str | None, answer: str, fraction: float) -> str | None:
    """The first ⌊fraction·n⌋ of the reference's n steps (non-blank lines; at least 1, at most n − 1), cut before the
    first step that states the answer, each ending in a newline; None where nothing is left to show."""
    steps = [line.strip() for line in (reference_solution or "").splitlines() if line.strip()]
    k = min(len(steps) - 1, max(1, math.floor(fraction * len(steps))))
    for j, step in enumerate(steps[:k]):
        if mentions_answer(step, answer):
            k = j
            break
    return "".join(s + "\n" for s in steps[:k]) if k >= 1 else None


def preflight(config) -> None:
    """Before any work: the policy can be loaded."""
    check_policy(config)


def settings(config) -> dict:
    return guidance.settings(STAGE.name, config)


def inputs(config, upstream: dict[str, StageOutput]) -> dict:
    """The guidance stages' inputs; in `form: response` the plain template (the prompt shown) too."""
    out = guidance.inputs(STAGE.name, config, upstream)
    if config.prefix.form == "response":
        out["prompt:plain"] = "sha256:" + sha256_bytes(load_template(config.template_path("plain")).template.encode())
    return out


def plan(job: Job) -> ShardPlan:
    """The stuck problems with a prefix to show, each with it and its loss prompt, in shards of `prefix.shard_size`."""
    config, pc = job.config, job.config.prefix
    problems, by_problem, stuck = guidance.load_groups(STAGE.name, config, job.upstream)
    fraction, items, skipped = pc.fraction(), [], 0
    for pid in stuck:
        if not any(r["finish_reason"] != "error" for r in by_problem[pid]):
            continue
        p = problems[pid]
        shown = prefix_steps(p.get("reference_solution"), p["answer"], fraction)
        if shown is None:
            skipped += 1
            continue
        item = {"problem": p, "guidance": shown, "loss_prompt": None if pc.loss == "guided" else by_problem[pid][0]["loss_prompt"]}
        if pc.form == "response":
            item.update(template="plain", response_start=shown)
        items.append(item)
    context = {"stuck": stuck, "levels": {pid: problems[pid]["level"] for pid in stuck}, "fraction": fraction, "no_prefix": skipped}
    return make_plan(job, items, pc.shard_size, context)


def run_shard(config, shard_plan: ShardPlan, i: int) -> dict:
    """Shard ``i``'s problems with their prefixes: sampled (or reused), verified, the kept rows written."""
    pc = config.prefix
    return guidance.run_guided_shard(STAGE, pc, config, shard_plan, i, "rollouts", guidance.process_by_loss(pc.loss),
                                     form=pc.form, loss=pc.loss)


def teardown() -> None:
    """After the shards (tasks/core/shards.py): this process's shared policy backends are freed."""
    release_backends()


def assemble(job: Job, shard_plan: ShardPlan) -> StageOutput:
    """The shards' kept samples as dataset `prefixed`, with the unlock summary."""
    pc = job.config.prefix
    out, summary = guidance.assemble_samples(job, shard_plan, "prefixed", {
        "fraction": shard_plan.context["fraction"], "form": pc.form, "loss": pc.loss,
        "prefixed_problems": sum(map(len, shard_plan.shards)), "no_prefix": shard_plan.context["no_prefix"]})
    log.info("prefix: %.0f%% of the reference shown on %d stuck problems (%d with nothing to show: a reference of one step, or "
             "whose first step states the answer); %d of %d unlocked by a verified continuation (%d of %d kept right) -> %s",
             100 * summary["fraction"], summary["prefixed_problems"], summary["no_prefix"], summary["unlocked_problems"],
             summary["stuck_problems"], summary["right"], summary["kept"], out.path)
    return out


def describe(s: dict) -> str:
    return (f"prefix ({s.get('fraction', 0):.0%} of the reference, form {s.get('form')}, loss {s.get('loss')}; "
            f"{s.get('no_prefix')} stuck problems with nothing to show) unlocked "
            f"{s.get('unlocked_problems')} of {s.get('stuck_problems')} stuck problems ({s.get('unlocked_fraction', 0):.1%}) with "
            f"a verified continuation; {s.get('kept')} kept, {s.get('right')} right{unscored_note(s)}{reuse.reuse_note(s)}{served_note(s)}")
