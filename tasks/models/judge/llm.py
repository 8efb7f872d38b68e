"""The LLM judge (``judge.backend: openai``): its prompts, the parsing of its replies (a reply that cannot be parsed is
asked once more with a reminder of the format, then recorded with ``parse_ok = false`` — never turned into a 0 or a
1), and ``LLMJudge``, which grades traces by outcome, by step (three protocols) or by rubric item."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

from tasks.models.judge.client import JudgeClient, open_client
from tasks.models.judge.rule import RuleJudge
from tasks.models.judge.traces import JudgeError, Trace, grade_row, to_reward
from tasks.models.prompts import load_template

log = logging.getLogger("guidedrl.judge")


# --------------------------------------------------------------------------- LLM judge: prompts and parsing

_SCORE = re.compile(r"SCORE\W*([1-5])(?![\d.])", re.IGNORECASE)
_NUMBERED = {kind: re.compile(rf"{kind}\W*(\d+)\W*([1-5])(?![\d.])", re.IGNORECASE) for kind in ("STEP", "ITEM")}
_RUBRIC_ITEM = re.compile(r"ITEM:\s*\**\s*(\d+(?:\.\d+)?)\s*\|\s*(.+)", re.IGNORECASE)

REMINDER = {
    "outcome": "Your reply could not be read. Reply again; the last line must be exactly `SCORE: n` with n from 1 to 5.",
    "segment": "Your reply could not be read. Reply again; the last line must be exactly `SCORE: n` with n from 1 to 5.",
    "process": "Your reply could not be read. Reply again with exactly one line `STEP k: n` (n from 1 to 5) for each of the {n} steps, k = 1..{n}.",
    "items": "Your reply could not be read. Reply again with exactly one line `ITEM k: n` (n from 1 to 5) for each of the {n} rubric items, k = 1..{n}.",
    "rubric": "Your reply could not be read. Reply again with 2 to 8 lines, each exactly `ITEM: weight | checkpoint`.",
}


def parse_score(text: str) -> int | None:
    found = _SCORE.findall(text or "")
    return int(found[-1]) if found else None


def parse_numbered(text: str, kind: str, n: int) -> list[int] | None:
    """Scores ``KIND k: s`` for k = 1..n (the last line for a k wins); None unless all are there."""
    got: dict[int, int] = {}
    for k, s in _NUMBERED[kind].findall(text or ""):
        got[int(k)] = int(s)
    if n == 0 or any(k not in got for k in range(1, n + 1)):
        return None
    return [got[k] for k in range(1, n + 1)]


def parse_rubric(text: str) -> list[dict] | None:
    items = [{"text": t.strip().strip("*").strip(), "weight": float(w)} for w, t in _RUBRIC_ITEM.findall(text or "")]
    items = [i for i in items if i["text"] and i["weight"] > 0]
    return items or None


def fill_template(template: Template, where: str, **fields: Any) -> str:
    try:
        return template.substitute(**{k: str(v) for k, v in fields.items()})
    except (KeyError, ValueError) as exc:
        raise ValueError(f"judge prompt template {where}: {exc}; allowed fields: {', '.join('$' + k for k in fields)}") from None


@dataclass
class JudgePrompts:
    outcome: Template
    process: Template
    items: Template
    rubric: Template
    segment: Template
    names: dict = field(default_factory=dict)

    KINDS = ("outcome", "process", "items", "rubric", "segment")

    @classmethod
    def load(cls, paths: dict[str, str | Path]) -> "JudgePrompts":
        return cls(**{k: load_template(paths[k]) for k in cls.KINDS}, names={k: str(v) for k, v in paths.items()})

    def fingerprint(self) -> str:
        blob = "\0".join(getattr(self, k).template for k in self.KINDS)
        return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def grading_request(trace: Trace, mode: str, prompts: JudgePrompts, step_split: str) -> tuple[str, str, int, list[str]]:
    """(kind, user message, expected count, steps) of one trace's judge request."""
    steps = trace.step_texts(step_split)
    common = {"question": trace.question, "reference": trace.reference, "trace": trace.completion}
    if mode == "process":
        cps = ""
        if trace.rubric:
            cps = "<checkpoints>\n" + "\n".join(f"- {i['text']}" for i in trace.rubric) + "\n</checkpoints>\n"
        numbered = "\n\n".join(f"[step {k}]\n{s}" for k, s in enumerate(steps, 1))
        return "process", fill_template(prompts.process, prompts.names.get("process", "process"), steps=numbered, n_steps=len(steps),
                                checkpoints=cps, **common), len(steps), steps
    if trace.rubric:
        items = "\n".join(f"{k}. (weight {i['weight']:g}) {i['text']}" for k, i in enumerate(trace.rubric, 1))
        return "items", fill_template(prompts.items, prompts.names.get("items", "items"), items=items, n_items=len(trace.rubric), **common), len(trace.rubric), steps
    return "outcome", fill_template(prompts.outcome, prompts.names.get("outcome", "outcome"), **common), 1, steps


def prefix_requests(trace: Trace, prompts: JudgePrompts, step_split: str) -> list[tuple[str, str, int, list[str]]]:
    """The paper's process protocol: one outcome-style request per step prefix y≤t (the judge
    rates how surely the reasoning so far leads to the reference's answer); s_t is its score."""
    steps = trace.step_texts(step_split)
    common = {"question": trace.question, "reference": trace.reference}
    return [("outcome", fill_template(prompts.outcome, prompts.names.get("outcome", "outcome"),
                                      trace="\n\n".join(steps[: t + 1]), **common), 1, steps) for t in range(len(steps))]


def segment_requests(trace: Trace, prompts: JudgePrompts, step_split: str) -> list[tuple[str, str, int, list[str]]]:
    """The ExpRL authors' main protocol: one request per step showing that step alone (no earlier
    steps), the problem and the whole reference; the judge picks the reference's checkpoints and rates
    whether this single step could be a correct, useful next step on its path. s_t is its score."""
    steps = trace.step_texts(step_split)
    return [("segment", fill_template(prompts.segment, prompts.names.get("segment", "segment"), question=trace.question,
                                      reference=trace.reference, step=step), 1, steps) for step in steps]


#: process protocols that send one request per step
PER_STEP = {"prefix": prefix_requests, "segment": segment_requests}


def ask(client: JudgeClient, requests: list[tuple[str, str, int]], parse) -> tuple[list[Any], list[str | None], list[str | None]]:
    """Send (kind, user message, expected count) requests; a reply that does not
    parse is asked once more with a reminder of the format. Returns per request
    (parsed value or None, last raw reply, error)."""
    first = [[{"role": "user", "content": text}] for _, text, _ in requests]
    replies = client.complete(first)
    parsed = [parse(kind, r.content, n) if r.content is not None else None for (kind, _, n), r in zip(requests, replies)]
    again = [i for i, (p, r) in enumerate(zip(parsed, replies)) if p is None and r.content is not None]
    raws = [r.content for r in replies]
    errors = [f"request failed: {r.error}" if r.error else None for r in replies]
    if again:
        client.stats["reminders"] += len(again)
        second = [first[i] + [{"role": "assistant", "content": replies[i].content},
                              {"role": "user", "content": REMINDER[requests[i][0]].format(n=requests[i][2])}] for i in again]
        for i, r in zip(again, client.complete(second)):
            if r.content is None:
                errors[i] = f"unparseable judge answer; the format reminder failed: {r.error}"
                continue
            raws[i] = r.content
            parsed[i] = parse(requests[i][0], r.content, requests[i][2])
            if parsed[i] is None:
                errors[i] = "unparseable judge answer (also after a reminder of the format)"
    return parsed, raws, errors


def _parse_grade(kind: str, text: str | None, n: int):
    if kind in ("outcome", "segment"):
        return parse_score(text or "")
    return parse_numbered(text or "", "STEP" if kind == "process" else "ITEM", n)


class LLMJudge:
    """An LLM behind an OpenAI-compatible endpoint grades traces (see module doc)."""

    def __init__(self, client: JudgeClient, prompts: JudgePrompts, mode: str = "process", step_split: str = "auto",
                 protocol: str = "trace"):
        self.client, self.prompts, self.mode, self.step_split = client, prompts, mode, step_split
        self.per_step = PER_STEP.get(protocol) if mode == "process" else None
        self.protocol = protocol if mode == "process" else None
        self.name = f"openai:{client.model}"

    @property
    def stats(self) -> Counter:
        return self.client.stats

    def requests(self, traces: list[Trace]) -> list[tuple[str, str, int, list[str]]]:
        """Every request grading ``traces`` sends first: one per trace, or with the prefix and segment protocols one per step."""
        if self.per_step:
            return [r for t in traces if not t.error for r in self.per_step(t, self.prompts, self.step_split)]
        return [grading_request(t, self.mode, self.prompts, self.step_split) for t in traces]

    def grade(self, traces: list[Trace]) -> list[dict]:
        if self.per_step:
            return self._grade_per_step(traces)
        rows: list[dict | None] = [None] * len(traces)
        send, reqs = [], []
        for i, (t, req) in enumerate(zip(traces, self.requests(traces))):
            if t.error:
                rows[i] = grade_row(t, self.name, steps=req[3], error=t.error, mode=self.mode)
            elif req[2] == 0:
                rows[i] = grade_row(t, self.name, error="empty trace: nothing to grade", mode=self.mode)
            else:
                send.append(i)
                reqs.append(req)
        parsed, raws, errors = ask(self.client, [r[:3] for r in reqs], _parse_grade)
        for i, (kind, _, _, steps), scores, raw, err in zip(send, reqs, parsed, raws, errors):
            t = traces[i]
            if scores is None:
                rows[i] = grade_row(t, self.name, steps=steps, raw=raw, error=err or "unparseable judge answer", mode=self.mode)
            elif kind == "outcome":
                rows[i] = grade_row(t, self.name, outcome=to_reward(scores), steps=steps, raw=raw, parse_ok=True, mode=self.mode)
            elif kind == "items":
                weights = [float(it["weight"]) for it in t.rubric or []]
                value = sum(w * to_reward(s) for w, s in zip(weights, scores)) / sum(weights)
                rows[i] = grade_row(t, self.name, outcome=round(value, 6), steps=steps, raw=raw, parse_ok=True, mode=self.mode)
            else:  # process: the score after the last step is the outcome
                step_scores = [to_reward(s) for s in scores]
                rows[i] = grade_row(t, self.name, outcome=step_scores[-1], step_scores=step_scores, steps=steps, raw=raw,
                                    parse_ok=True, mode=self.mode)
        return rows  # type: ignore[return-value]

    def _grade_per_step(self, traces: list[Trace]) -> list[dict]:
        """Process mode, one request per step (prefix: s_t = the score of the prefix y≤t; segment: of step t
        alone); a trace is graded when every step's reply parsed — one that does not masks the whole trace.
        The outcome: the last prefix's score (prefix), the mean step score (segment)."""
        per_trace = [self.per_step(t, self.prompts, self.step_split) if not t.error else [] for t in traces]
        flat = [r[:3] for reqs in per_trace for r in reqs]
        parsed, raws, errors = ask(self.client, flat, _parse_grade)
        what = "step" if self.protocol == "segment" else "prefix"
        rows, at = [], 0
        for t, reqs in zip(traces, per_trace):
            steps = t.step_texts(self.step_split)
            scores, raw, errs = parsed[at : at + len(reqs)], raws[at : at + len(reqs)], errors[at : at + len(reqs)]
            at += len(reqs)
            if t.error:
                rows.append(grade_row(t, self.name, steps=steps, error=t.error, mode=self.mode))
            elif not reqs:
                rows.append(grade_row(t, self.name, error="empty trace: nothing to grade", mode=self.mode))
            elif any(s is None for s in scores):
                k = next(i for i, s in enumerate(scores) if s is None)
                rows.append(grade_row(t, self.name, steps=steps, raw=raw[k],
                                      error=f"{what} {k + 1} of {len(reqs)}: {errs[k] or 'unparseable judge answer'}", mode=self.mode))
            else:
                step_scores = [to_reward(s) for s in scores]
                outcome = round(sum(step_scores) / len(step_scores), 6) if what == "step" else step_scores[-1]
                rows.append(grade_row(t, self.name, outcome=outcome, step_scores=step_scores, steps=steps,
                                      raw="\n---\n".join(r or "" for r in raw), parse_ok=True, mode=self.mode))
        return rows


def judge_prompts(config) -> JudgePrompts:
    """The judge templates named in ``prompts.*`` (built-in names or files)."""
    return JudgePrompts.load({"outcome": config.template_path("judge_outcome"), "process": config.template_path("judge_process"),
                              "items": config.template_path("judge_items"), "rubric": config.template_path("rubric"),
                              "segment": config.template_path("judge_segment")})


def make_judge(config, workspace: Path):
    """The judge of ``config.judge`` (``RuleJudge``, or ``LLMJudge`` caching under ``<workspace>/cache/judge``): the one
    `grade` grades with and the rewards for other trainers score with (tasks/models/rewards.py)."""
    jc = config.judge
    if jc.backend == "rule":
        return RuleJudge(jc.mode, jc.step_split, jc.process_protocol)
    return LLMJudge(open_client(config, workspace), judge_prompts(config), jc.mode, jc.step_split, jc.process_protocol)


def check_judge(config) -> None:
    """Before any work (``preflight``): an LLM judge has a model and an endpoint to send to."""
    jc = config.judge
    if jc.backend == "openai" and not ((jc.model or os.environ.get("OPENAI_MODEL")) and (jc.base_url or os.environ.get("OPENAI_BASE_URL"))):
        missing = [k for k, v, env in (("judge.model", jc.model, "OPENAI_MODEL"), ("judge.base_url", jc.base_url, "OPENAI_BASE_URL"))
                   if not (v or os.environ.get(env))]
        raise JudgeError(f"{', '.join(missing)}: judge.backend openai needs them in the config (or OPENAI_MODEL / "
                         "OPENAI_BASE_URL in the environment)")
