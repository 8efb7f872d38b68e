"""Stage `hint` (LTE, learning from trial and error): hints from the policy's own mistakes.

Inputs: the curated `problems`, the plain `rollouts` of the current policy, the
`hint` prompt template.

Method, only for problems where every one of the G rollouts failed:
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
from collections import Counter, defaultdict

from tasks.answers import steps_correct
from tasks.config import Config
from tasks.generation import SamplingParams
from tasks.prompts import fill, load_template
from tasks.rollouts import add_loss_logprobs, chat_tokenizer, open_backend, policy_id_for, render, sample_rows
from tasks.schemas import to_table
from tasks.store import Store, StageOutput, sha256_bytes, stage_key

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
    stage_cfg = config.stage_config(STAGE)
    template = load_template(config.template_path("hint"))
    inputs = {
        "problems": upstream["curate"].fingerprints["problems"],
        "rollouts": upstream["rollouts"].fingerprints["rollouts"],
        "policy": policy_id_for(config),
        "prompt:hint": "sha256:" + sha256_bytes(template.template.encode()),
    }
    return stage_key(STAGE, stage_cfg, inputs, STAGE_VERSION), stage_cfg, inputs


def run(config: Config, store: Store, upstream: dict[str, StageOutput], force: bool = False) -> tuple[StageOutput, bool]:
    key, stage_cfg, inputs = key_for(config, upstream)
    existing = store.reusable(STAGE, key, force)
    if existing is not None:
        return existing, True
    hc, rc = config.hint, config.rollouts
    problems = {p["problem_id"]: p for p in upstream["curate"].read("problems").to_pylist()}
    by_problem: dict[str, list[dict]] = defaultdict(list)
    for r in upstream["rollouts"].read("rollouts").to_pylist():
        by_problem[r["problem_id"]].append(r)
    policy_id = policy_id_for(config)
    seen = {r["policy_id"] for rs in by_problem.values() for r in rs}
    if seen != {policy_id}:
        raise ValueError(f"hint: the rollouts were sampled by {sorted(seen)}, the configured policy is {policy_id}; "
                         "LTE hints must come from the current policy's own mistakes")

    stuck = sorted(pid for pid, rs in by_problem.items() if not any(r["correct"] for r in rs))
    targets, hints, kinds = [], [], Counter()
    for pid in stuck:
        built = build_hint(by_problem[pid], hc.max_wrong_answers)
        if built is not None:
            targets.append(pid)
            hints.append(built[0])
            kinds[built[1]] += 1

    kept: list[dict] = []
    leaks = sampled = 0
    if targets:
        backend = open_backend(config)
        tokenizer = chat_tokenizer(config, backend)
        template = load_template(config.template_path("hint"))
        target_problems = [problems[pid] for pid in targets]
        hinted = [render(tokenizer, fill(template, p["question"], hint=h)) for p, h in zip(target_problems, hints)]
        plain = [by_problem[pid][0]["loss_prompt"] for pid in targets]
        params = SamplingParams(
            n=hc.samples_per_problem or rc.samples_per_problem,
            temperature=rc.temperature if hc.temperature is None else hc.temperature,
            top_p=rc.top_p,
            max_new_tokens=hc.max_new_tokens or rc.max_new_tokens,
            seed=hc.seed,
        )
        samples = backend.generate(hinted, params)
        rows = sample_rows(target_problems, samples, hinted, backend.policy_id, prompt_kind="hint",
                           guidance=hints, loss_prompts=plain)
        sampled = len(rows)
        for r in rows:
            if not r["correct"]:
                continue
            if hc.leak_check and mentions_hint(r["completion"], r["guidance"]):
                leaks += 1
                continue
            kept.append(r)
        add_loss_logprobs(backend, kept, params.temperature)  # the same tokens under the hint-free prompt

    unlocked = sorted({r["problem_id"] for r in kept})
    levels = Counter(str(problems[pid]["level"]) for pid in stuck)
    summary = {
        "stuck_problems": len(stuck),
        "hinted_problems": len(targets),
        "hint_kinds": dict(sorted(kinds.items())),
        "sampled": sampled,
        "kept": len(kept),
        "leaks_rejected": leaks,
        "unlocked_problems": len(unlocked),
        "unlocked_fraction": round(len(unlocked) / len(stuck), 4) if stuck else 0.0,
        "unlocked_by_level": {lvl: sum(1 for pid in unlocked if str(problems[pid]["level"]) == lvl) for lvl in sorted(levels)},
        "stuck_by_level": dict(sorted(levels.items())),
        "kept_with_all_steps_right": sum(steps_correct(r["completion"]) for r in kept),
    }
    out = store.write(STAGE, key, {"hints": ("rollouts", to_table(kept, "rollouts", "hint/hints"))}, config=stage_cfg,
                      inputs=inputs, stage_version=STAGE_VERSION, summary=summary, replace=force,
                      dataset_summaries={"hints": summary})
    log.info("hint: %d of %d stuck problems unlocked by a verified hinted sample (%d kept, %d with every step right) -> %s",
             len(unlocked), len(stuck), len(kept), summary["kept_with_all_steps_right"], out.path)
    return out, False
