"""The ExpRL judge: grades a sampled trace against a reference solution the
policy never saw.

Two judges with one interface (``Judge.grade(items) -> grades``):

- ``RuleJudge`` (``judge.backend: rule``, the default): for references whose
  worked solution carries checkable intermediate results (lines ``a op b = c``,
  as the reasoning-gym arithmetic references do), those results are the rubric,
  and a step earns credit only for stating one of them *as the result of the
  matching operation*. A number that merely appears (an answer copied without
  the step that produces it) earns nothing.
- ``LLMJudge`` (``judge.backend: openai``): the `openai` client against any
  OpenAI-compatible endpoint, async with bounded concurrency, the client's own
  retries (exponential backoff with jitter on 429, 5xx, time-outs and dropped
  connections; ``Retry-After`` honoured), a per-request time-out, and every
  request/response pair cached on disk by (model, messages, sampling
  parameters), so a re-run pays only for what is missing.

Scores are on the 1–5 scale of the papers, stored as (s − 1)/4. Modes:
outcome (one score per trace), process (the trace split into steps, one score
per step: token advantages are s_t − s_(t−1), DESIGN.md), and, with a rubric,
one score per weighted rubric item (reward = weighted sum). Process mode has
three protocols (``judge.process_protocol``): ``trace`` (one request per trace
rating how far along the reference's path each step is), ``prefix`` (one
request per step prefix y≤t) and ``segment`` (one request per step, showing
that step alone: could it be a correct, useful next step on the reference's
path? — the ExpRL authors' main configuration). A judge reply that cannot be
parsed is asked once more with a reminder of the format, then recorded with
``parse_ok = false`` — never turned into a 0 or a 1.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import logging
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from string import Template
from typing import Any

from tasks.core.interrupt import run_cancellable
from tasks.models.answers import REASONING_CLOSE, REASONING_OPEN
from tasks.models.prompts import load_template
from tasks.models.token_text import DELIMITER, pieces_of, step_char_ranges, token_spans, token_steps  # noqa: F401 (DELIMITER: judge.step_split)

log = logging.getLogger("guidedrl.judge")


class JudgeError(RuntimeError):
    """The judge cannot run (no endpoint, over budget, too many failed requests)."""


def to_reward(score: int | float) -> float:
    """A 1–5 judge score on the 0–1 scale: (s − 1)/4."""
    return (float(score) - 1.0) / 4.0


# --------------------------------------------------------------------------- traces -> steps

_HEADER = re.compile(r"^\s*###", re.MULTILINE)


def steps_of_tokens(tokenizer, ids: list[int], delimiter: str = DELIMITER) -> tuple[list[str], list[tuple[int, int]]]:
    """A completion's steps cut on its tokens (``token_steps`` over what each token adds to the decoded text): each
    step's text (its range of the decoded completion) and its token span."""
    text, spans = token_spans(tokenizer, ids)
    steps = token_steps(pieces_of(text, spans), delimiter)
    return [text[a:b] for a, b in step_char_ranges(spans, steps, len(text))], steps


def judge_view(text: str) -> str:
    """A completion as the papers' judges see a trace: its reasoning and its answer as plain text — special tokens were
    removed when it was decoded, and a reasoning block's markers (``<think>``, ``</think>``) become paragraph breaks, so
    that every step cut from this text is a piece of the completion between markers (materialize finds it there)."""
    if REASONING_OPEN not in text and REASONING_CLOSE not in text:
        return text
    return text.replace(REASONING_OPEN, "\n\n").replace(REASONING_CLOSE, "\n\n").strip()


def completion_steps(tokenizer, completion: str, ids: list[int] | None) -> tuple[list[str], list[tuple[int, int]]]:
    """``steps_of_tokens`` of a sampled completion: its token ids, or (a text-only server's row, no ids) the text tokenized."""
    if ids is None or (len(ids) == 0 and completion):
        ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return steps_of_tokens(tokenizer, list(ids))


def split_steps(text: str, how: str = "auto") -> list[str]:
    """A trace as steps: at markdown ``###`` headers when there are any, else at
    blank-line paragraphs; ``auto`` splits a single paragraph of several lines
    at its lines (short step-per-line traces such as the tiny policy's).
    ``###``: after each delimiter, as ``token_steps`` cuts a character-level token
    stream (with token ids at hand, use ``steps_of_tokens``: the cut follows the tokens)."""
    if how == DELIMITER:
        return [text[a:b] for a, b in token_steps(list(text), DELIMITER)] if text.strip() else []
    text = text.strip()
    if not text:
        return []
    if how in ("auto", "headers") and _HEADER.search(text):
        starts = [m.start() for m in _HEADER.finditer(text)]
        if starts[0] > 0:
            starts.insert(0, 0)
        return [s for s in (text[a:b].strip() for a, b in zip(starts, starts[1:] + [len(text)])) if s]
    if how == "lines":
        return [line.strip() for line in text.splitlines() if line.strip()]
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if how == "auto" and len(paragraphs) == 1:
        return [line.strip() for line in text.splitlines() if line.strip()]
    return paragraphs


# --------------------------------------------------------------------------- checkable intermediate results

_NUM = r"-?\d+(?:\.\d+)?"
_EQUATION = re.compile(rf"(?<![\w.])({_NUM})\s*([+\-−*/×·x])\s*({_NUM})\s*=\s*({_NUM})(?![\w.])")
_OPS = {"+": "+", "-": "-", "−": "-", "*": "*", "×": "*", "·": "*", "x": "*", "/": "/"}


@dataclass(frozen=True)
class Checkpoint:
    """An intermediate result of the reference: ``a op b = value``."""

    a: Decimal
    op: str
    b: Decimal
    value: Decimal

    @property
    def text(self) -> str:
        return f"{self.a} {self.op} {self.b} = {self.value}"

    def matches(self, other: "Checkpoint") -> bool:
        """Same operation (operands in either order where it commutes), same result."""
        if self.op != other.op or self.value != other.value:
            return False
        same = (self.a, self.b) == (other.a, other.b)
        return same or (self.op in "+*" and (self.a, self.b) == (other.b, other.a))


def equations(text: str) -> list[Checkpoint]:
    """Every ``a op b = c`` stated in a text (whatever its arithmetic)."""
    out = []
    for a, op, b, c in _EQUATION.findall(text):
        try:
            out.append(Checkpoint(Decimal(a), _OPS[op], Decimal(b), Decimal(c)))
        except InvalidOperation:
            continue
    return out


def checkpoints(reference: str | None) -> list[Checkpoint]:
    """The reference's checkable intermediate results, in order (duplicates once)."""
    seen: list[Checkpoint] = []
    for eq in equations(reference or ""):
        if eq not in seen:
            seen.append(eq)
    return seen


def rule_rubric(reference: str | None) -> list[dict]:
    """The rule judge's rubric: one equally weighted item per checkpoint."""
    return [{"text": cp.text, "weight": 1.0} for cp in checkpoints(reference)]


# --------------------------------------------------------------------------- what is graded


@dataclass
class Trace:
    """One sampled trace to grade, with what the judge may see of its problem."""

    sample_id: str
    problem_id: str
    question: str
    reference: str  # the reference solution (or the answer alone): never shown to the policy
    completion: str
    correct: bool
    rubric: list[dict] | None = None  # [{text, weight}]
    error: str | None = None  # the sample itself failed (generation error): not sent
    steps: list[str] | None = None  # the steps cut on the completion's tokens (judge.step_split "###"); else cut from the text

    def step_texts(self, how: str) -> list[str]:
        return self.steps if self.steps is not None else split_steps(self.completion, how)


def reference_text(problem: dict) -> str:
    return problem.get("reference_solution") or f"The answer is {problem['answer']}."


def grade_row(trace: Trace, judge: str, *, outcome: float | None = None, step_scores: list[float] | None = None,
              steps: list[str] | None = None, raw: str | None = None, parse_ok: bool = False, error: str | None = None,
              mode: str = "outcome") -> dict:
    return {
        "sample_id": trace.sample_id,
        "problem_id": trace.problem_id,
        "outcome_score": outcome if parse_ok else None,
        "step_scores": step_scores if parse_ok else None,
        "steps": steps or [],
        "judge": judge,
        "judge_raw": raw,
        "parse_ok": parse_ok,
        "error": error,
        "mode": mode,
        "correct": trace.correct,
    }


def _true(eq: Checkpoint) -> bool:
    """Is ``a op b = value`` right arithmetic? (a division by 0 is not)"""
    a, b = eq.a, eq.b
    if eq.op == "/":
        return b != 0 and abs(a / b - eq.value) < Decimal("1e-6")
    return {"+": a + b, "-": a - b, "*": a * b}[eq.op] == eq.value


_BOXED = re.compile(r"\\boxed\{")


def segment_score(step: str, cps: list[Checkpoint], correct: bool) -> int:
    """The rule judge's 1–5 score of one step seen alone, on the ExpRL authors' segment scale: 5 it
    establishes a checkpoint of the reference (or states the final answer, which is right); 1 it
    misleads or contradicts (wrong arithmetic, a checkpoint's operation with another result, a wrong
    final answer); 2 true arithmetic off the reference's path; 3 nothing checkable (generic)."""
    stated = equations(step)
    contradicts = any(not _true(eq) for eq in stated) or any(
        cp.op == eq.op and {cp.a, cp.b} == {eq.a, eq.b} and cp.value != eq.value for eq in stated for cp in cps)
    if contradicts:
        return 1
    if any(cp.matches(eq) for eq in stated for cp in cps):
        return 5
    if _BOXED.search(step):
        return 5 if correct else 1
    return 2 if stated else 3


class RuleJudge:
    """Credit for the reference's intermediate results, stated as the result of
    the matching operation. Process mode: after step t, the weighted fraction of
    checkpoints reached by steps 1..t; with the segment protocol, each step alone
    on the authors' 1–5 scale (``segment_score``). Outcome: the fraction for the
    whole trace, at most 0.75 when the final answer is wrong (on the path, not there)."""

    name = "rule"

    def __init__(self, mode: str = "process", step_split: str = "auto", protocol: str = "trace"):
        self.mode, self.step_split = mode, step_split
        self.segment = mode == "process" and protocol == "segment"
        self.stats: Counter = Counter()

    def grade(self, traces: list[Trace]) -> list[dict]:
        return [self.grade_one(t) for t in traces]

    def grade_one(self, trace: Trace) -> dict:
        steps = trace.step_texts(self.step_split)
        if trace.error:
            return grade_row(trace, self.name, steps=steps, error=trace.error, mode=self.mode)
        items = trace.rubric if trace.rubric is not None else rule_rubric(trace.reference)
        cps = [(checkpoints(i["text"]), float(i["weight"])) for i in items]
        cps = [(c[0], w) for c, w in cps if c and w > 0]
        if not cps:
            return grade_row(trace, self.name, steps=steps, mode=self.mode,
                             error="rule judge: the reference has no checkable intermediate results (lines `a op b = c`)")
        total = sum(w for _, w in cps)
        if self.segment:  # each step alone: s_t = (score_t − 1)/4; the outcome is their mean
            if not steps:
                return grade_row(trace, self.name, error="empty trace: nothing to grade", mode=self.mode)
            scores = [to_reward(segment_score(step, [cp for cp, _ in cps], trace.correct)) for step in steps]
            raw = json.dumps({"protocol": "segment", "scores": [int(4 * x + 1) for x in scores]})
            return grade_row(trace, self.name, outcome=round(sum(scores) / len(scores), 6), step_scores=scores, steps=steps,
                             raw=raw, parse_ok=True, mode=self.mode)
        reached: set[int] = set()
        scores = []
        for step in steps:
            stated = equations(step)
            for i, (cp, _) in enumerate(cps):
                if i not in reached and any(cp.matches(eq) for eq in stated):
                    reached.add(i)
            scores.append(round(sum(cps[i][1] for i in reached) / total, 6))
        progress = scores[-1] if scores else 0.0
        outcome = progress if trace.correct else min(progress, 0.75)
        raw = json.dumps({"reached": [cps[i][0].text for i in sorted(reached)], "checkpoints": len(cps)})
        return grade_row(trace, self.name, outcome=outcome, step_scores=scores if self.mode == "process" else None,
                         steps=steps, raw=raw, parse_ok=True, mode=self.mode)


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


# --------------------------------------------------------------------------- the request cache


class RequestCache:
    """Judge answers on disk, one JSON file per (model, messages, sampling parameters)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @staticmethod
    def key(model: str, messages: list[dict], params: dict) -> str:
        blob = json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        try:
            return json.loads(self._path(key).read_text())["content"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return None

    def put(self, key: str, record: dict) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{id(record)}")
        tmp.write_text(json.dumps(record, ensure_ascii=False))
        tmp.replace(path)  # atomic: a reader sees the whole answer or none


@dataclass
class Reply:
    content: str | None
    error: str | None = None
    cached: bool = False


class JudgeClient:
    """Chat completions through the `openai` client, cached, bounded, retried."""

    def __init__(self, model: str | None, base_url: str | None, api_key_env: str, cache: RequestCache, *,
                 temperature: float = 0.0, max_tokens: int = 1024, concurrency: int = 16, timeout: float = 60.0,
                 max_retries: int = 5, max_requests: int | None = None):
        self.model = model or os.environ.get("OPENAI_MODEL")
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        if not self.model or not self.base_url:
            raise JudgeError("judge.backend openai needs `judge.model` and `judge.base_url` in the config "
                             "(or OPENAI_MODEL and OPENAI_BASE_URL in the environment)")
        self.api_key_env = api_key_env
        self.cache = cache
        self.params = {"temperature": temperature, "max_tokens": max_tokens}
        self.concurrency, self.timeout, self.max_retries = concurrency, timeout, max_retries
        self.max_requests = max_requests
        self.stats: Counter = Counter()  # requests, cache_hits, retries, failed
        importlib.import_module("openai")  # imported here, once, not inside the first batch of requests

    def key(self, messages: list[dict]) -> str:
        return RequestCache.key(self.model, messages, self.params)

    def complete(self, batch: list[list[dict]]) -> list[Reply]:
        """One reply per message list, from the cache where it is there."""
        replies: list[Reply | None] = []
        todo = []
        for i, messages in enumerate(batch):
            hit = self.cache.get(self.key(messages))
            if hit is not None:
                self.stats["cache_hits"] += 1
                replies.append(Reply(hit, cached=True))
            else:
                replies.append(None)
                todo.append(i)
        if todo:
            if self.max_requests is not None and self.stats["requests"] + len(todo) > self.max_requests:
                raise JudgeError(f"the judge would send {len(todo)} requests (plus {self.stats['requests']} already sent), over "
                                 f"judge.max_requests = {self.max_requests}; nothing was sent. Raise the limit or grade fewer traces.")
            for i, reply in zip(todo, run_cancellable(self._send_all([batch[i] for i in todo]))):
                replies[i] = reply
        return replies  # type: ignore[return-value]

    async def _send_all(self, batch: list[list[dict]]) -> list[Reply]:
        from openai import AsyncOpenAI, DefaultAsyncHttpxClient

        api_key = os.environ.get(self.api_key_env)
        if not api_key and not self.stats["requests"]:
            log.warning("judge: $%s is not set; sending no key (fine for a local vLLM server)", self.api_key_env)
        attempts = Counter()

        async def on_request(request):  # every HTTP attempt, retries included
            attempts["n"] += 1

        sem = asyncio.Semaphore(self.concurrency)
        http = DefaultAsyncHttpxClient(event_hooks={"request": [on_request]})
        async with AsyncOpenAI(base_url=self.base_url, api_key=api_key or "EMPTY", timeout=self.timeout,
                               max_retries=self.max_retries, http_client=http) as client:
            replies = await asyncio.gather(*(self._one(client, sem, m) for m in batch))
        self.stats["requests"] += len(batch)
        self.stats["retries"] += max(0, attempts["n"] - len(batch))
        return list(replies)

    async def _one(self, client, sem: asyncio.Semaphore, messages: list[dict]) -> Reply:
        async with sem:
            try:
                # the raw response: the client's retries and errors, without building pydantic
                # models of the reply (that parsing is most of the client's CPU time per request)
                raw = await client.chat.completions.with_raw_response.create(model=self.model, messages=messages, **self.params)
                body = raw.http_response.json()
                choices = body.get("choices") or []
                content = (choices[0].get("message") or {}).get("content") if choices else None
                if not isinstance(content, str):
                    raise ValueError(f"the reply has no message content: {str(body)[:200]}")
            except Exception as exc:  # every request ends answered or with its reason
                self.stats["failed"] += 1
                return Reply(None, error=f"{type(exc).__name__}: {exc}"[:300])
        usage = body.get("usage")
        record = {"model": self.model, "messages": messages, "params": self.params, "content": content, "usage": usage,
                  "created": time.time()}
        await asyncio.to_thread(self.cache.put, self.key(messages), record)  # on disk before the answer is used
        return Reply(content)


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


def estimate_tokens(text: str) -> int:
    """Roughly four characters a token: enough for a spending estimate."""
    return (len(text) + 3) // 4


def request_plan(client: JudgeClient, texts: list[str]) -> dict:
    """How many of these first requests are not cached, and roughly how many tokens they would send."""
    missing = [t for t in texts if client.cache.get(client.key([{"role": "user", "content": t}])) is None]
    return {"requests": len(missing), "cached": len(texts) - len(missing),
            "prompt_tokens": sum(estimate_tokens(t) for t in missing),
            "max_completion_tokens": len(missing) * client.params["max_tokens"],
            "max_requests": client.max_requests, "endpoint": f"{client.base_url} ({client.model})"}


# --------------------------------------------------------------------------- from a run's config


def judge_prompts(config) -> JudgePrompts:
    """The judge templates named in ``prompts.*`` (built-in names or files)."""
    return JudgePrompts.load({"outcome": config.template_path("judge_outcome"), "process": config.template_path("judge_process"),
                              "items": config.template_path("judge_items"), "rubric": config.template_path("rubric"),
                              "segment": config.template_path("judge_segment")})


def check_judge(config) -> None:
    """Before any work (``preflight``): an LLM judge has a model and an endpoint to send to."""
    jc = config.judge
    if jc.backend == "openai" and not ((jc.model or os.environ.get("OPENAI_MODEL")) and (jc.base_url or os.environ.get("OPENAI_BASE_URL"))):
        missing = [k for k, v, env in (("judge.model", jc.model, "OPENAI_MODEL"), ("judge.base_url", jc.base_url, "OPENAI_BASE_URL"))
                   if not (v or os.environ.get(env))]
        raise JudgeError(f"{', '.join(missing)}: judge.backend openai needs them in the config (or OPENAI_MODEL / "
                         "OPENAI_BASE_URL in the environment)")


def open_client(config, workspace: Path) -> JudgeClient:
    """The judge client of ``config.judge``, caching under ``<workspace>/cache/judge``."""
    jc = config.judge
    return JudgeClient(jc.model, jc.base_url, jc.api_key_env, RequestCache(Path(workspace) / "cache" / "judge"),
                       temperature=jc.temperature, max_tokens=jc.max_tokens, concurrency=jc.concurrency,
                       timeout=jc.timeout_seconds, max_retries=jc.max_retries, max_requests=jc.max_requests)


def check_failures(stage: str, rows: list[dict], max_failed_fraction: float, client: JudgeClient) -> None:
    """Fail the stage when more requests failed (after retries) than allowed;
    what was answered stays cached, so the re-run sends only the rest."""
    failed = [r for r in rows if (r.get("error") or "").startswith("request failed")]
    if rows and len(failed) > max_failed_fraction * len(rows):
        reasons = Counter(r["error"].removeprefix("request failed: ")[:80] for r in failed).most_common(3)
        raise JudgeError(f"{stage}: {len(failed)} of {len(rows)} judge requests to {client.base_url} failed after "
                         f"{client.max_retries} retries ({', '.join(f'{n}x {why}' for why, n in reasons)}); the answers received "
                         f"are cached under {client.cache.root}, a re-run sends only the missing requests "
                         f"(judge.max_failed_fraction = {max_failed_fraction})")


def derivation_right(judge: RuleJudge, problem: dict, text: str, correct: bool) -> bool:
    """A right answer that states every intermediate result of the problem's reference (a reference
    without checkable lines: the answer alone decides)."""
    if not correct:
        return False
    g = judge.grade_one(Trace("", str(problem["problem_id"]), problem["question"], reference_text(problem), text, True))
    return not g["parse_ok"] or g["outcome_score"] >= 1.0
