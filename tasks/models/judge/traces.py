"""What the judges grade and what they give back: a ``Trace`` (a sampled completion with what the judge may see of
its problem), its steps, and a grade row (the `grades` contract); the 1–5 scale mapped to rewards."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tasks.models.answers import REASONING_CLOSE, REASONING_OPEN
from tasks.models.token_text import DELIMITER, pieces_of, step_char_ranges, token_spans, token_steps


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
