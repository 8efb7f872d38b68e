"""Answer checking: ``check(completion, problem) -> (extracted_answer, correct)``.

Extraction rules (completions are asked to end with ``\\boxed{...}``):

1. The answer is the content of the **last** ``\\boxed{...}`` (or ``\\fbox{...}``)
   in the completion, braces balanced, so ``\\boxed{\\frac{1}{2}}`` gives
   ``\\frac{1}{2}``.
2. With no box, math-verify's own extraction over the whole completion is the
   fallback: an answer phrase ("the final answer is ...", "answer: ..."), else
   the last LaTeX expression or plain number. ``extracted_answer`` is then the
   text math-verify matched.
3. Nothing found: ``extracted_answer`` is None and the answer is not correct.
4. A completion with a reasoning block (``<think>`` … ``</think>``, as Qwen3 and
   DeepSeek-R1 write) is answered after the block (``answer_region``): a box
   inside the reasoning is not the answer, and a block never closed (the trace
   ran out of tokens while thinking) has no answer. Completions are decoded
   with special tokens removed; the block's markers are not special tokens.

Correctness:

* reasoning-gym problems (their ``metadata`` names the task and carries the
  generator's entry) are scored by the generator's own ``score_answer`` on the
  extracted answer; only a full score of 1.0 is correct — partial credit is
  not;
* every other problem goes through math-verify: ``verify(parse(gold),
  parse(answer))`` — fractions, decimals, sets, intervals, LaTeX and plain
  expressions compare by value.

math-verify guards its own time with SIGALRM, which only works on the main
thread. Off the main thread we switch its timeouts off and bound the time
ourselves: the check runs on a helper thread and is abandoned (counted as not
correct) after ``timeout_seconds``.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from functools import lru_cache
from typing import Any, Mapping

log = logging.getLogger("guidedrl.answers")

DEFAULT_TIMEOUT_SECONDS = 5.0
_BOX_MARKERS = ("\\boxed", "\\fbox")
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``/``\\fbox{...}`` with balanced braces, or None."""
    start = max(text.rfind(m) for m in _BOX_MARKERS)
    while start >= 0:
        i = start + (6 if text.startswith("\\boxed", start) else 5)
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j].strip()
                j += 1
        # unbalanced or no brace: look for an earlier box
        start = max(text.rfind(m, 0, start) for m in _BOX_MARKERS)
    return None


def _problem_field(problem: Any, name: str) -> Any:
    if isinstance(problem, Mapping):
        return problem.get(name)
    return getattr(problem, name, None)


def _rg_info(problem: Any) -> dict | None:
    meta = _problem_field(problem, "metadata")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            return None
    if isinstance(meta, Mapping) and isinstance(meta.get("reasoning_gym"), Mapping):
        return dict(meta["reasoning_gym"])
    return None


@lru_cache(maxsize=None)
def _rg_scorer(task: str):
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(task)


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _mv_parse(text: str, signal_ok: bool, timeout: float):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    return parse(
        text,
        extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
        parsing_timeout=max(1, int(timeout)) if signal_ok else None,
    )


def _math_verify(gold: str, extracted_text: str, signal_ok: bool, timeout: float) -> bool:
    from math_verify import verify

    gold_parsed = _mv_parse(_wrap(gold), signal_ok, timeout)
    answer_parsed = _mv_parse(_wrap(extracted_text), signal_ok, timeout)
    if not gold_parsed or not answer_parsed:
        return False
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=max(1, int(timeout)) if signal_ok else None))


def _wrap(answer: str) -> str:
    """Put a bare answer in a box so math-verify reads it as LaTeX first."""
    return answer if any(m in answer for m in _BOX_MARKERS) else f"\\boxed{{{answer}}}"


def _fallback_extract(completion: str, signal_ok: bool, timeout: float) -> str | None:
    parsed = _mv_parse(completion, signal_ok, timeout)
    if not parsed:
        return None
    # math-verify returns [sympy_value, matched_string]; the string is what the model wrote
    return str(parsed[-1]).strip() or None


#: a reasoning block's markers (Qwen3, DeepSeek-R1)
REASONING_OPEN, REASONING_CLOSE = "<think>", "</think>"


def answer_region(completion: str) -> str:
    """Where a completion's answer is: after its reasoning block's last ``</think>``; nothing where a block was opened
    and never closed; the whole completion where there is no block."""
    end = completion.rfind(REASONING_CLOSE)
    if end >= 0:
        return completion[end + len(REASONING_CLOSE):]
    return "" if REASONING_OPEN in completion else completion


def _check(completion: str, problem: Any, signal_ok: bool, timeout: float) -> tuple[str | None, bool]:
    completion = answer_region(completion)
    gold = _problem_field(problem, "answer")
    if gold is None:
        raise ValueError("problem has no `answer`")
    gold = str(gold)
    extracted = last_boxed(completion)
    if extracted is None:
        extracted = _fallback_extract(completion, signal_ok, timeout)
    if not extracted:
        return None, False
    rg = _rg_info(problem)
    if rg is not None:
        entry = dict(rg.get("entry") or {})
        entry.setdefault("answer", gold)
        entry.setdefault("question", _problem_field(problem, "question"))
        entry.setdefault("metadata", {})
        try:
            score = float(_rg_scorer(rg["task"])(answer=extracted, entry=entry))
        except Exception as exc:  # a generator's scorer raising on odd input is a wrong answer
            log.debug("reasoning-gym scorer for %s raised %r on %r", rg["task"], exc, extracted)
            score = 0.0
        return extracted, score >= 1.0
    return extracted, _math_verify(gold, extracted, signal_ok, timeout)


def check(completion: str, problem: Any, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> tuple[str | None, bool]:
    """Extract the final answer of ``completion`` and check it against ``problem``
    (a problems row: a mapping or object with ``answer`` and ``metadata``)."""
    if _on_main_thread():
        try:
            return _check(completion, problem, True, timeout_seconds)
        except TimeoutError:
            return last_boxed(answer_region(completion)), False
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="guidedrl-check")
    future = _pool.submit(_check, completion, problem, False, timeout_seconds)
    try:
        return future.result(timeout=timeout_seconds)
    except FutureTimeout:
        log.warning("answer check took over %.1fs and was abandoned (counted as not correct)", timeout_seconds)
        return last_boxed(answer_region(completion)), False


_STEP = re.compile(r"^(-?\d+) ([+-]) (-?\d+) = (-?\d+)$")


def steps_correct(text: str) -> bool:
    """Every line ``a op b = c`` of a completion is arithmetically right (and there is one)."""
    steps = [m for m in (_STEP.match(line.strip()) for line in text.splitlines()) if m]
    return bool(steps) and all(
        int(a) + (int(b) if op == "+" else -int(b)) == int(c) for a, op, b, c in (m.groups() for m in steps)
    )


def chain_sum_reference(expression: str) -> str:
    """Left-to-right partial sums of a reasoning-gym chain sum, one per line,
    e.g. ``12 + 7 - 3`` -> ``12 + 7 = 19`` / ``19 - 3 = 16`` / ``The answer is 16.``"""
    parts = expression.split()
    if len(parts) % 2 == 0 or any(op not in "+-" for op in parts[1::2]):
        raise ValueError(f"not a chain sum expression: {expression!r}")
    total = int(parts[0])
    lines = []
    for op, term in zip(parts[1::2], parts[2::2]):
        value = int(term)
        new = total + value if op == "+" else total - value
        lines.append(f"{total} {op} {value} = {new}")
        total = new
    if not lines:
        lines.append(f"{total} = {total}")
    lines.append(f"The answer is {total}.")
    return "\n".join(lines)


def mentions_answer(text: str, answer: str) -> bool:
    """The text states the answer: the answer's text, stripped, stands in it as a whole token (not inside a longer
    number or word: 27 is in "= 27." and in "-27", not in "127" or "2.75"). The leak check of guidance that must
    not give the answer away (a reference prefix, a self-written hint)."""
    a = str(answer).strip()
    if not a:
        return False
    return re.search(rf"(?<![\w.]){re.escape(a)}(?![\w]|\.\d)", text) is not None
