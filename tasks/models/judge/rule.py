"""The rule judge (``judge.backend: rule``, the default): for references whose worked solution carries checkable
intermediate results (lines ``a op b = c``, as the reasoning-gym arithmetic references do), those results are the
rubric, and a step earns credit only for stating one of them *as the result of the matching operation*. A number that
merely appears (an answer copied without the step that produces it) earns nothing."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from tasks.models.judge.traces import Trace, grade_row, reference_text, to_reward


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


def derivation_right(judge: RuleJudge, problem: dict, text: str, correct: bool) -> bool:
    """A right answer that states every intermediate result of the problem's reference (a reference
    without checkable lines: the answer alone decides)."""
    if not correct:
        return False
    g = judge.grade_one(Trace("", str(problem["problem_id"]), problem["question"], reference_text(problem), text, True))
    return not g["parse_ok"] or g["outcome_score"] >= 1.0
