"""Stage `curate`'s checks on rows and questions: text normalisation and the stable `problem_id`, the deterministic
train/eval split, the word n-grams that decontamination compares, and each row's validation (a reason for every
rejected row)."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from typing import Any

from tasks.stages._curate_sources import SourceConfig, _Row

_WS = re.compile(r"[ \t\f\v\u00a0]+")
_TOKEN = re.compile(r"\w+|[^\w\s]")
_SPACES = re.compile(r"\s+")
_BLANK_LINES = re.compile(r"\n{3,}")


# --------------------------------------------------------------------------- text and ids


def normalize_text(text: str) -> str:
    """NFKC, unix line endings, runs of spaces collapsed, lines stripped at the
    right, at most one blank line in a row, no leading/trailing blank space.
    Idempotent: normalising normalised text changes nothing."""
    if not text.isascii():  # NFKC leaves ASCII as it is
        text = unicodedata.normalize("NFKC", text)
    text = _WS.sub(" ", text.replace("\r\n", "\n").replace("\r", "\n"))  # _WS stops at line ends: as if line by line
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


def _key_text(normalized: str) -> str:
    """The text a problem id hashes, of a question already normalised (``normalize_text``)."""
    return _SPACES.sub(" ", normalized).strip().casefold()


def problem_id(question: str) -> str:
    """Stable id of a question: equal after normalisation means equal id."""
    return _id_of_normalized(normalize_text(question))


def _id_of_normalized(question: str) -> str:
    return hashlib.sha256(_key_text(question).encode()).hexdigest()[:16]


def _tokens(question: str) -> list[str]:
    """The word tokens of a normalised question (curated questions are)."""
    return _TOKEN.findall(_key_text(question))


def _windows(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    if len(tokens) < n:
        return [tuple(tokens)] if tokens else []
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _informative_ngrams(tokens: list[str], template: set, n: int) -> set[tuple[str, ...]]:
    """The question's n-grams once its template text is cut out.

    Tokens covered by a template n-gram are removed; n-grams are then taken
    within each remaining run of tokens (a run shorter than n counts as one
    n-gram of its own length; runs under 3 tokens left over from a template,
    such as a lone "=", say nothing and are dropped)."""
    if not template:
        return set(_windows(tokens, n))
    covered = [False] * len(tokens)
    if len(tokens) >= n:
        for i in range(len(tokens) - n + 1):
            if tuple(tokens[i : i + n]) in template:
                covered[i : i + n] = [True] * n
    elif tuple(tokens) in template:
        covered = [True] * len(tokens)
    if not any(covered):
        return set(_windows(tokens, n))
    grams: set[tuple[str, ...]] = set()
    run: list[str] = []
    for tok, cov in zip(tokens + [""], covered + [True]):
        if not cov:
            run.append(tok)
            continue
        if len(run) >= min(n, 3):
            grams.update(_windows(run, n))
        run = []
    return grams


def _split_of(pid: str, seed: int, eval_fraction: float) -> str:
    u = int(hashlib.sha256(f"{seed}:{pid}".encode()).hexdigest()[:12], 16) / float(1 << 48)
    return "eval" if u < eval_fraction else "train"


def _as_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # NaN from a CSV/Parquet cell
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return value
    return None


def _validate(row: _Row, src: SourceConfig, max_chars: int) -> tuple[dict | None, str | None]:
    if row.error:
        return None, f"unparseable: {row.error}"
    q = _as_text(row.question)
    if q is None and row.question is not None:
        return None, f"bad_type: question is a {type(row.question).__name__}, not text"
    question = normalize_text(q) if q is not None else ""
    if not question:
        return None, "empty_question: the question is missing or blank"
    if len(q) > max_chars:
        return None, f"too_long: the question has {len(q):,} characters (problems.max_question_chars: {max_chars:,})"
    a = _as_text(row.answer)
    if a is None and row.answer is not None:
        return None, f"bad_type: answer is a {type(row.answer).__name__}, not text or a number"
    answer = normalize_text(a) if a is not None else ""
    if not answer:
        return None, "no_answer: the answer is missing or blank"
    split = src.split or (_as_text(row.split) or None)
    if split is not None and split not in ("train", "eval"):
        return None, f"bad_split: split {split!r} is not 'train' or 'eval'"
    level = src.level or (src.reasoning_gym.level if src.reasoning_gym else None) or _as_text(row.level)
    ref = _as_text(row.reference_solution)
    return {
        "problem_id": _id_of_normalized(question),
        "question": question,
        "answer": answer,
        "reference_solution": normalize_text(ref) if ref else None,
        "source": row.source,
        "level": level or None,
        "split": split,
        "metadata": json.dumps({"source_index": row.index, **row.metadata}, sort_keys=True, default=str),
    }, None


def _reject(row: _Row, reason: str) -> dict:
    return {"source": row.source, "row": json.dumps(row.data, sort_keys=True, default=str), "reason": reason}
