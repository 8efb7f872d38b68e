"""Stage `self_hint` (NuRL, SAGE): the policy writes a hint from the reference, then solves the stuck problem with it.

Inputs: the curated `problems` (their answer or reference solution), the plain `rollouts` of the current policy, the
problems `filter` kept (the stuck ones), the `self_hint_write` and `self_hint` prompt templates.

Method, only for the problems `filter` kept where every one of the G rollouts failed (NuRL: pass rate 0; in shards of
`self_hint.shard_size`):
1. the policy writes `write_samples` hints from the reference answer (`write_from: answer`, NuRL) or the reference
   solution (`write_from: reference_solution`, SAGE), shown through the `self_hint_write` template as `$answer`
   (writing sample j drawn with the seed of (seed, problem_id, j, self_hint_write)); each is cut to its first
   `hint_lines` lines (null: all) and the first that does not state the answer is the problem's hint (the leak
   check: `tasks.models.answers.mentions_answer`); a problem whose written hints all state it, or are empty, gets none;
2. G samples from the hinted prompt (template `prompts.self_hint`), verified;
3. `loss: guided` (NuRL's and SAGE's form: the hinted prompt is trained on, every sample right or wrong, a GRPO group
   of its own; at test time no hint): `loss_prompt` is the hinted prompt; `loss: plain` (LTE's form): the right
   samples are scored under the original prompt and replace failed rollouts with the shaped ratio.

Outputs: dataset `self_hints` (rollout rows, `prompt_kind = 'self_hint'`, `guidance` = the hint) and a summary: hints
written, rejected by the leak check, problems with a hint, and how many stuck problems got a verified hinted sample.
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import Field

from tasks.core import reuse
from tasks.core.config import StrictModel
from tasks.core.shards import ShardPlan, make_plan
from tasks.core.stage import Job, Stage
from tasks.core.store import StageOutput, sha256_bytes
from tasks.models.answers import mentions_answer
from tasks.models.generation import SamplingParams
from tasks.models.policy import chat_tokenizer, check_policy, release_backends, render, shared_backend
from tasks.models.prompts import fill, load_template
from tasks.models.sampling import sample_seeds
from tasks.stages import _guidance as guidance
from tasks.stages.rollouts import served_note, unscored_note

#: the prompt template the policy writes its hint with (prompts.self_hint_write)
WRITE_TEMPLATE = "self_hint_write"


class SelfHintConfig(StrictModel):
    """Self-written hints: on the stuck problems (those `filter` kept) the policy writes a hint from the reference
    and is re-prompted with it."""

    write_from: Literal["answer", "reference_solution"] = Field(
        "answer", description="what the hint writer is shown as $answer: the reference answer (NuRL) or the reference solution (SAGE)")
    write_samples: int = Field(4, gt=0, description="hints written per stuck problem; the first that passes the leak check is used")
    write_temperature: float | None = Field(None, ge=0, description="default: rollouts.temperature")
    write_max_new_tokens: int | None = Field(None, gt=0, description="default: rollouts.max_new_tokens")
    hint_lines: int | None = Field(None, gt=0, description="keep the first this many lines of a written hint (null: all of it)")
    loss: Literal["guided", "plain"] = Field("guided", description="guided: every hinted sample trains under the hinted prompt, a "
                                             "group of its own (NuRL, SAGE); plain: right hinted samples replace failed rollouts "
                                             "under the original prompt with the shaped ratio (LTE's loss)")
    samples_per_problem: int | None = Field(None, gt=0, description="hinted samples per stuck problem (default: rollouts.samples_per_problem)")
    temperature: float | None = Field(None, ge=0, description="default: rollouts.temperature")
    max_new_tokens: int | None = Field(None, gt=0, description="default: rollouts.max_new_tokens")
    seed: int = 0
    shard_size: int = Field(32, gt=0, description="problems per shard (the rows do not depend on it); a crash resumes at the first unfinished shard")


STAGE = Stage(name="self_hint", version="1", module=__name__, upstream=guidance.UPSTREAM, writes={"self_hints": "rollouts"},
              section="self_hint", settings_model=SelfHintConfig, sharded=True)

log = logging.getLogger("guidedrl.self_hint")


def usable_hint(text: str, answer: str, hint_lines: int | None) -> str | None:
    """A written hint as shown: its first ``hint_lines`` non-blank lines, stripped; None where nothing is left or it
    states the answer."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    hint = "\n".join(lines[:hint_lines] if hint_lines else lines)
    return hint if hint and not mentions_answer(hint, answer) else None


def preflight(config) -> None:
    """Before any work: the policy can be loaded."""
    check_policy(config)


def settings(config) -> dict:
    return guidance.settings(STAGE.name, config)


def inputs(config, upstream: dict[str, StageOutput]) -> dict:
    """The guidance stages' inputs, and the template the hints are written with."""
    template = load_template(config.template_path(WRITE_TEMPLATE)).template
    return {**guidance.inputs(STAGE.name, config, upstream), f"prompt:{WRITE_TEMPLATE}": "sha256:" + sha256_bytes(template.encode())}


def plan(job: Job) -> ShardPlan:
    """The stuck problems (some rollout generated), each with its loss prompt, in shards of `self_hint.shard_size`."""
    config, sc = job.config, job.config.self_hint
    problems, by_problem, stuck = guidance.load_groups(STAGE.name, config, job.upstream)
    items = [{"problem": problems[pid], "loss_prompt": None if sc.loss == "guided" else by_problem[pid][0]["loss_prompt"]}
             for pid in stuck if any(r["finish_reason"] != "error" for r in by_problem[pid])]
    context = {"stuck": stuck, "levels": {pid: problems[pid]["level"] for pid in stuck}}
    return make_plan(job, items, sc.shard_size, context)


def write_hints(config, items: list[dict]) -> tuple[list[str | None], dict]:
    """Each item's hint (None: every written one stated the answer or was empty), and the writing counts."""
    sc, rc = config.self_hint, config.rollouts
    backend = shared_backend(config)
    tokenizer = chat_tokenizer(config, backend)
    template = load_template(config.template_path(WRITE_TEMPLATE))
    shown = [it["problem"]["answer"] if sc.write_from == "answer" else (it["problem"].get("reference_solution") or it["problem"]["answer"])
             for it in items]
    prompts = [render(tokenizer, fill(template, it["problem"]["question"], answer=text)) for it, text in zip(items, shown)]
    params = SamplingParams(n=sc.write_samples, temperature=rc.temperature if sc.write_temperature is None else sc.write_temperature,
                            top_p=rc.top_p, max_new_tokens=sc.write_max_new_tokens or rc.max_new_tokens, seed=sc.seed)
    seeds = [sample_seeds(sc.seed, it["problem"]["problem_id"], params.n, WRITE_TEMPLATE) for it in items]
    written = backend.generate(prompts, params, seeds) if items else []
    hints, counts = [], {"hints_written": 0, "hints_leaked": 0, "no_hint": 0}
    for it, group in zip(items, written):
        texts = [s.text for s in group if s.finish_reason != "error"]
        counts["hints_written"] += len(texts)
        answer = it["problem"]["answer"]
        cut = [usable_hint(t, answer, sc.hint_lines) for t in texts]
        counts["hints_leaked"] += sum(c is None for c in cut)
        hint = next((c for c in cut if c is not None), None)
        counts["no_hint"] += hint is None
        hints.append(hint)
    return hints, counts


def run_shard(config, shard_plan: ShardPlan, i: int) -> dict:
    """Shard ``i``: hints written for its problems, then the hinted samples (sampled or reused), verified and written."""
    sc = config.self_hint
    hints, counts = write_hints(config, shard_plan.shards[i])
    items = [{**it, "guidance": h} for it, h in zip(shard_plan.shards[i], hints) if h is not None]

    return guidance.run_guided_shard(STAGE, sc, config, shard_plan, i, "rollouts", guidance.process_by_loss(sc.loss), items=items,
                                     extra_meta=counts,
                                     loss=sc.loss, write_from=sc.write_from, hint_lines=sc.hint_lines)


def teardown() -> None:
    """After the shards (tasks/core/shards.py): this process's shared policy backends are freed."""
    release_backends()


def assemble(job: Job, shard_plan: ShardPlan) -> StageOutput:
    """The shards' kept samples as dataset `self_hints`, with the writing and unlock summary."""
    sc = job.config.self_hint
    out, summary = guidance.assemble_samples(job, shard_plan, "self_hints", {
        "write_from": sc.write_from, "loss": sc.loss, "problems": sum(map(len, shard_plan.shards)),
        **{k: int(shard_plan.total(k)) for k in ("hints_written", "hints_leaked", "no_hint")}})
    log.info("self_hint: %d hints written, %d stated the answer or were empty, %d problems without a hint; %d of %d stuck problems unlocked "
             "by a verified hinted sample -> %s", summary["hints_written"], summary["hints_leaked"], summary["no_hint"],
             summary["unlocked_problems"], summary["stuck_problems"], out.path)
    return out


def describe(s: dict) -> str:
    return (f"self-hints: {s.get('hints_written')} written, {s.get('hints_leaked')} stated the answer or were empty, {s.get('no_hint')} problems "
            f"without one; unlocked {s.get('unlocked_problems')} of {s.get('stuck_problems')} stuck problems "
            f"({s.get('unlocked_fraction', 0):.1%}); {s.get('kept')} kept, {s.get('right')} right"
            f"{unscored_note(s)}{reuse.reuse_note(s)}{served_note(s)}")
