"""Stage `hint` (LTE, learning from trial and error): hints from the policy's own mistakes.

Inputs: the curated `problems`, the plain `rollouts` of the current policy, the
`hint` prompt template.

Method, only for problems where every one of the G rollouts failed (in shards of
`hint.shard_size`, shard i sampled with seed + i; tasks/shards.py):
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
import sys
from collections import Counter

import pyarrow as pa

from tasks import guidance
from tasks.answers import steps_correct
from tasks.config import Config
from tasks.rollouts import add_loss_logprobs
from tasks.schemas import to_table
from tasks.shards import ShardPlan, make_plan, run_stage
from tasks.store import Store, StageOutput

STAGE = "hint"
STAGE_VERSION = "1"

log = logging.getLogger("guidedrl.hint")


def hint_text(wrong: list[str], truncated: bool) -> str:
    """LTE's hint: the policy's distinct wrong answers and/or a call to be concise."""
    parts = []
    if wrong:
        parts.append("These answers are wrong: " + ", ".join(wrong) + ".")
    if truncated:
        parts.append("Be concise.")
    return " ".join(parts)


def build_hint(rows: list[dict], max_wrong: int = 5) -> tuple[str, str] | None:
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
    wrong = wrong[:max_wrong]
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


def key_for(config: Config, upstream: dict[str, StageOutput]) -> tuple[str, dict, dict]:
    return guidance.key_for(STAGE, STAGE_VERSION, config, upstream)


def plan(config: Config, store: Store, upstream: dict[str, StageOutput]) -> ShardPlan:
    """The stuck problems LTE fires on, each with its hint and original prompt, in shards of `hint.shard_size`."""
    problems, by_problem, stuck = guidance.load_groups(STAGE, config, upstream)
    items, kinds = [], Counter()
    for pid in stuck:
        built = build_hint(by_problem[pid], config.hint.max_wrong_answers)
        if built is not None:
            items.append({"problem": problems[pid], "guidance": built[0], "loss_prompt": by_problem[pid][0]["loss_prompt"]})
            kinds[built[1]] += 1
    context = {"stuck": stuck, "levels": {pid: problems[pid]["level"] for pid in stuck}, "hint_kinds": dict(sorted(kinds.items()))}
    return make_plan(STAGE, store, key_for(config, upstream), items, config.hint.shard_size, context)


def run_shard(config: Config, shard_plan: ShardPlan, i: int) -> dict:
    """Sample shard ``i``'s problems with their hints, keep the verified samples, and write them."""
    hc = config.hint
    backend, rows, params = guidance.sample_guided(STAGE, hc, config, shard_plan.shards[i], i)
    kept, leaks = [], 0
    for r in rows:
        if not r["correct"]:
            continue
        if hc.leak_check and mentions_hint(r["completion"], r["guidance"]):
            leaks += 1
            continue
        kept.append(r)
    add_loss_logprobs(backend, kept, params.temperature)  # the same tokens under the hint-free prompt
    meta = {"sampled": len(rows), "leaks_rejected": leaks}
    shard_plan.write(i, to_table(kept, "rollouts", str(shard_plan.path(i))), meta)
    return meta


def assemble(store: Store, shard_plan: ShardPlan, force: bool = False) -> StageOutput:
    """The shards' kept hinted samples as dataset `hints`, with the unlock summary."""
    parts = shard_plan.tables("rollouts")
    kept = pa.concat_tables(parts).select(["problem_id", "completion"]).to_pylist()
    stuck = shard_plan.context["stuck"]
    summary = {
        "hinted_problems": sum(map(len, shard_plan.shards)),
        "hint_kinds": shard_plan.context["hint_kinds"],
        "sampled": int(shard_plan.total("sampled")),
        "kept": len(kept),
        "leaks_rejected": int(shard_plan.total("leaks_rejected")),
        **guidance.unlocked_summary(stuck, [r["problem_id"] for r in kept], shard_plan.context["levels"]),
        "kept_with_all_steps_right": sum(steps_correct(r["completion"]) for r in kept),
    }
    out = store.write(STAGE, shard_plan.key, {"hints": ("rollouts", parts)}, config=shard_plan.stage_cfg,
                      inputs=shard_plan.inputs, stage_version=STAGE_VERSION, summary=summary, replace=force,
                      dataset_summaries={"hints": summary})
    shard_plan.clean()
    log.info("hint: %d of %d stuck problems unlocked by a verified hinted sample (%d kept, %d with every step right) -> %s",
             summary["unlocked_problems"], len(stuck), len(kept), summary["kept_with_all_steps_right"], out.path)
    return out


def run(config: Config, store: Store, upstream: dict[str, StageOutput], force: bool = False) -> tuple[StageOutput, bool]:
    return run_stage(sys.modules[__name__], config, store, upstream, force, describe="hint: hinted samples of the stuck problems")
