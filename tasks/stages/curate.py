"""Stage `curate`: problem sources in, one problems dataset and one rejected dataset out.

Inputs: the `problems` section of the config — any mix of local files
(JSONL, JSON, CSV, Parquet, with a column mapping), Hugging Face datasets on
local disk, and reasoning-gym generators.

Method, in order:
1. read every source into rows; a row that cannot be used (no answer, empty
   question, unparseable line, bad split label) goes to `rejected` with a reason;
   a file that cannot be read at all is an error naming the file;
2. normalise the question text (Unicode NFKC, line endings, runs of spaces) and
   give it a stable `problem_id` (sha256 of the case-folded, whitespace-collapsed
   question);
3. drop exact duplicates (same `problem_id`) into `rejected`, first one kept;
4. split train/eval deterministically by id (a source or row may fix its split);
5. decontaminate train against eval by word n-gram overlap, not counting
   n-grams that occur in most questions of one source (a generator's template);
6. write a worked `reference_solution` for procedural tasks whose generator gives
   none (chain sums: the left-to-right partial sums).

Outputs: datasets `problems` and `rejected` (schemas in tasks/core/schemas.py) and a
summary of how many rows went where, per source and per reason.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import logging
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from pydantic import Field, model_validator

from tasks.core.config import StrictModel
from tasks.core.schemas import to_table
from tasks.core.stage import Job, Stage
from tasks.core.store import StageOutput, fingerprint_files, iter_batches, write_parquet
from tasks.models.answers import chain_sum_reference
from tasks.core import progress

# --------------------------------------------------------------------------- settings (config section `problems`)


class ReasoningGymSpec(StrictModel):
    task: str = Field(description="reasoning-gym dataset name, e.g. chain_sum")
    size: int = Field(gt=0)
    seed: int = 0
    level: str | None = None
    config: dict[str, Any] = Field(default_factory=dict, description="generator config, e.g. min_terms")


class HFSpec(StrictModel):
    """A Hugging Face dataset on local disk: a ``save_to_disk`` directory
    (``path``) or local data files loaded by a builder (``format`` + ``data_files``).
    Nothing is downloaded."""

    path: str | None = None
    format: Literal["parquet", "json", "csv"] | None = None
    data_files: str | list[str] | None = None
    split: str = "train"

    @model_validator(mode="after")
    def _one_way(self):
        if bool(self.path) == bool(self.data_files):
            raise ValueError("give either 'path' (a save_to_disk directory) or 'data_files' with 'format'")
        if self.data_files and not self.format:
            raise ValueError("'data_files' needs 'format': one of parquet, json, csv")
        return self


class SourceConfig(StrictModel):
    """One problem source. Exactly one of ``file``, ``hf``, ``reasoning_gym``."""

    file: str | None = None
    hf: HFSpec | None = None
    reasoning_gym: ReasoningGymSpec | None = None
    format: Literal["jsonl", "json", "csv", "parquet"] | None = Field(
        None, description="file format; default from the file extension"
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="contract column -> column name in the input (question, answer, reference_solution, level, split)",
    )
    source: str | None = Field(None, description="the value of the `source` column; default from the file or task name")
    level: str | None = Field(None, description="level label for every row of this source")
    split: Literal["train", "eval"] | None = Field(None, description="put every row of this source in this split")
    allow_empty: bool = Field(False, description="accept a source that yields no problems (by default that is an error naming its rejections)")

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("file", "hf", "reasoning_gym") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "a source needs exactly one of 'file', 'hf', 'reasoning_gym'"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.reasoning_gym is not None and self.reasoning_gym.level and self.level:
            raise ValueError("give 'level' once: inside reasoning_gym or beside it, not both")
        allowed = {"question", "answer", "reference_solution", "level", "split"}
        bad = sorted(set(self.columns) - allowed)
        if bad:
            raise ValueError(f"columns: unknown contract column(s) {bad}; allowed: {sorted(allowed)}")
        return self

    @property
    def kind(self) -> str:
        return "file" if self.file is not None else "hf" if self.hf is not None else "reasoning_gym"


class DecontaminationConfig(StrictModel):
    enabled: bool = True
    ngram: int = Field(8, ge=1, description="n of the word n-grams compared")
    threshold: float = Field(
        0.5, gt=0, le=1, description="a train problem is contaminated when this fraction of its n-grams occur in eval problems"
    )
    template_fraction: float = Field(
        0.5, gt=0, le=1, description="n-grams in more than this fraction of one source's questions are template text and do not count"
    )


class ProblemsConfig(StrictModel):
    sources: list[SourceConfig] = Field(min_length=1)
    eval_fraction: float = Field(0.2, ge=0, lt=1)
    split_seed: int = 0
    decontamination: DecontaminationConfig = Field(default_factory=DecontaminationConfig)
    max_question_chars: int = Field(20_000, gt=0, description="longer questions are rejected (too_long): no prompt of megabytes reaches a model or a judge")


STAGE = Stage(name="curate", version="1", module=__name__, writes={"problems": "problems", "rejected": "rejected"},
              section="problems", settings_model=ProblemsConfig, online=False)

log = logging.getLogger("guidedrl.curate")

_WS = re.compile(r"[ \t\f\v\u00a0]+")
_TOKEN = re.compile(r"\w+|[^\w\s]")
_SPACES = re.compile(r"\s+")
_BLANK_LINES = re.compile(r"\n{3,}")


class SourceError(ValueError):
    """A problem source that cannot be read at all; the message names the file."""


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


# --------------------------------------------------------------------------- reference solutions


#: reasoning-gym task -> writer of a worked solution from the entry's metadata
REFERENCE_WRITERS: dict[str, Callable[[dict], str]] = {
    "chain_sum": lambda entry: chain_sum_reference(entry["metadata"]["expression"]),
}


# --------------------------------------------------------------------------- reading sources


@dataclass
class _Row:
    """One input row as read from its source, before validation."""

    source: str
    index: int
    data: dict[str, Any]  # the input row (for `rejected`)
    question: Any = None
    answer: Any = None
    reference_solution: Any = None
    level: Any = None
    split: Any = None
    metadata: dict = field(default_factory=dict)
    error: str | None = None  # a row-level read error: goes to rejected


def _source_name(src: SourceConfig) -> str:
    if src.source:
        return src.source
    if src.kind == "file":
        return Path(src.file).stem
    if src.kind == "hf":
        return Path(src.hf.path or (src.hf.data_files if isinstance(src.hf.data_files, str) else src.hf.data_files[0])).stem
    return f"reasoning_gym/{src.reasoning_gym.task}"


def _file_format(src: SourceConfig, path: Path) -> str:
    if src.format:
        return src.format
    ext = path.suffix.lower()
    fmt = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(ext)
    if fmt is None:
        raise SourceError(f"{path}: cannot tell the format from the extension {ext!r}; set `format:` (jsonl, json, csv, parquet)")
    return fmt


def _not_utf8(path: Path) -> SourceError:
    """The error for a text file that is not UTF-8: its encoding where a BOM tells, else the first bad byte's line."""
    raw = path.read_bytes()
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return SourceError(f"{path}: UTF-16 text (byte-order mark {raw[:2].hex()}); save it as UTF-8")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        return SourceError(f"{path}: line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                           "save the file as UTF-8")
    return SourceError(f"{path}: not UTF-8 text")


def _read_records(path: Path, fmt: str) -> Iterator[tuple[dict | None, str | None]]:
    """Yield (record, None) or (None, row-level error) for each row of a file. Text files are
    UTF-8 (a byte-order mark is accepted); any other encoding is an error naming the file and line."""
    if not path.is_file():
        raise SourceError(f"{path}: problem file not found")
    try:
        yield from _read_text_records(path, fmt)
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _read_text_records(path: Path, fmt: str) -> Iterator[tuple[dict | None, str | None]]:
    if fmt == "jsonl":
        with open(path, encoding="utf-8-sig") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield {"line": lineno, "text": line.rstrip("\n")[:500]}, f"line {lineno}: not valid JSON ({exc.msg})"
                    continue
                if not isinstance(rec, dict):
                    yield {"line": lineno, "text": line.rstrip("\n")[:500]}, f"line {lineno}: a JSON {type(rec).__name__}, expected an object"
                    continue
                yield rec, None
    elif fmt == "json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as exc:
            raise SourceError(f"{path}: not valid JSON ({exc})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise SourceError(f"{path}: expected a JSON list of objects (or {{'data': [...]}})")
        for i, rec in enumerate(data):
            if isinstance(rec, dict):
                yield rec, None
            else:
                yield {"item": i, "value": rec}, f"item {i}: a JSON {type(rec).__name__}, expected an object"
    elif fmt == "csv":
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames:
                raise SourceError(f"{path}: empty CSV file (no header row)")
            try:
                for rec in reader:
                    if None in rec:  # more cells than header columns
                        yield {k: v for k, v in rec.items() if k is not None}, f"line {reader.line_num}: more cells than header columns"
                        continue
                    yield rec, None
            except csv.Error as exc:
                raise SourceError(f"{path}: line {reader.line_num}: malformed CSV ({exc})") from None
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise SourceError(f"{path}: cannot be read as Parquet ({exc})") from None
        for rec in table.to_pylist():
            yield rec, None


def _mapped(rec: dict, src: SourceConfig) -> dict[str, Any]:
    """Pick contract fields from an input record using the source's column mapping."""
    out = {}
    for name in ("question", "answer", "reference_solution", "level", "split"):
        col = src.columns.get(name, name)
        out[name] = rec.get(col)
    return out


def _check_columns(columns: list[str], src: SourceConfig, where: str) -> None:
    for name in ("question", "answer"):
        col = src.columns.get(name, name)
        if col not in columns:
            hint = "" if name in src.columns else f"; map it with `columns: {{{name}: <input column>}}`"
            raise SourceError(f"{where}: no column {col!r} for `{name}` (columns: {sorted(columns)}){hint}")
    for name, col in src.columns.items():
        if col not in columns:
            raise SourceError(f"{where}: mapped column {col!r} (for `{name}`) is not in the input (columns: {sorted(columns)})")


def _rows_from_records(records: Iterator[tuple[dict | None, str | None]], src: SourceConfig, name: str, where: str) -> Iterator[_Row]:
    checked = False
    for i, (rec, err) in enumerate(records):
        if err is not None:
            yield _Row(name, i, rec or {}, error=err)
            continue
        if not checked:
            _check_columns(list(rec), src, where)
            checked = True
        m = _mapped(rec, src)
        mapped_cols = {src.columns.get(k, k) for k in m}
        extra = {k: v for k, v in rec.items() if k not in mapped_cols}
        yield _Row(name, i, rec, **m, metadata={"row": extra} if extra else {})


def _read_file(src: SourceConfig, resolve: Callable[[str], Path], name: str) -> Iterator[_Row]:
    path = resolve(src.file)
    fmt = _file_format(src, path)
    return _rows_from_records(_read_records(path, fmt), src, name, str(path))


def _read_hf(src: SourceConfig, resolve: Callable[[str], Path], name: str) -> Iterator[_Row]:
    import datasets

    spec = src.hf
    if spec.path:
        path = resolve(spec.path)
        where = str(path)
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise SourceError(f"{path}: no Hugging Face dataset saved here (expected a save_to_disk directory)") from None
        if isinstance(ds, datasets.DatasetDict):
            if spec.split not in ds:
                raise SourceError(f"{path}: no split {spec.split!r}; splits: {list(ds)}")
            ds = ds[spec.split]
    else:
        files = [spec.data_files] if isinstance(spec.data_files, str) else list(spec.data_files)
        files = [str(resolve(f)) for f in files]
        where = ", ".join(files)
        for f in files:
            if not glob.glob(f):
                raise SourceError(f"{f}: data file not found")
        try:
            ds = datasets.load_dataset(spec.format, data_files=files, split=spec.split)
        except Exception as exc:
            raise SourceError(f"{where}: cannot be loaded with datasets ({type(exc).__name__}: {exc})") from None
    return _rows_from_records(((rec, None) for rec in ds), src, name, where)


def _read_reasoning_gym(src: SourceConfig, name: str) -> Iterator[_Row]:
    import reasoning_gym

    spec = src.reasoning_gym
    try:
        data = reasoning_gym.create_dataset(spec.task, size=spec.size, seed=spec.seed, **spec.config)
    except ValueError as exc:
        raise SourceError(f"reasoning_gym task {spec.task!r}: {exc}") from None
    except (TypeError, AssertionError) as exc:
        raise SourceError(f"reasoning_gym task {spec.task!r}: bad generator config {spec.config}: {exc}") from None
    writer = REFERENCE_WRITERS.get(spec.task)
    level = spec.level or src.level
    for i in range(len(data)):
        entry = data[i]
        ref = entry.get("metadata", {}).get("solution")
        if ref is None and writer is not None:
            ref = writer(entry)
        yield _Row(
            name,
            i,
            {"task": spec.task, "seed": spec.seed, "index": i, "question": entry.get("question")},
            question=entry.get("question"),
            answer=entry.get("answer"),
            reference_solution=ref,
            level=level,
            metadata={"reasoning_gym": {"task": spec.task, "entry": entry}},
        )


def read_source(src: SourceConfig, resolve: Callable[[str], Path] = Path) -> Iterator[_Row]:
    name = _source_name(src)
    if src.kind == "file":
        return _read_file(src, resolve, name)
    if src.kind == "hf":
        return _read_hf(src, resolve, name)
    return _read_reasoning_gym(src, name)


# --------------------------------------------------------------------------- the method


@dataclass
class CurationResult:
    problems: list[dict]
    rejected: list[dict]
    summary: dict


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


#: rows per Parquet part while curating (problems and rejected rows are written as they come)
PART_ROWS = 8192
#: per source, the questions (the lowest ids, ids being hashes: an even sample) whose n-grams estimate
#: its template text; a source with no more questions is counted whole, as before
TEMPLATE_SAMPLE = 20_000
#: the column that carries each accepted problem's input row until decontamination is done
_ROW_COL = "_input_row"


class _Parts:
    """Rows written to Parquet parts of ``PART_ROWS`` as they come (at least one part, maybe empty)."""

    def __init__(self, work: Path, name: str, kind: str):
        self.work, self.name, self.kind = work, name, kind
        self.rows: list[dict] = []
        self.paths: list[Path] = []
        self.count = 0

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.count += 1
        if len(self.rows) >= PART_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.rows or not self.paths:
            path = self.work / f"{self.name}-{len(self.paths):05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_parquet(to_table(self.rows, self.kind, f"curate/{self.name}"), path)
            self.paths.append(path)
            self.rows = []

    def close(self) -> list[Path]:
        self.flush()
        return self.paths


def _read_parts(paths: list[Path], columns: list[str] | None = None) -> Iterator[dict]:
    for batch in iter_batches(paths, 2048, columns):
        yield from batch.to_pylist()


def _templates(samples: dict[str, list], counts: Counter, cfg) -> dict[str, set]:
    """Per source, its template n-grams: in more than `template_fraction` of its (sampled) questions;
    none for a source of under 10 questions."""
    template: dict[str, set] = {}
    for source, heap in samples.items():
        df = Counter(g for _, tokens in heap for g in set(_windows(tokens, cfg.ngram)))
        limit = cfg.template_fraction * len(heap)
        template[source] = {g for g, c in df.items() if c > limit} if counts[source] >= 10 else set()
    return template


def _gram_key(gram: tuple[str, ...]) -> int:
    """A 64-bit key of an n-gram (the eval index holds keys, not tuples of strings): Python's own hash,
    the same for the same n-gram within the run that builds and queries the index (a cryptographic
    hash here took a sixth of the stage's time). Two n-grams share a key with odds ~ grams² / 2⁶⁴."""
    return hash(gram)


def curate_parts(cfg: ProblemsConfig, resolve: Callable[[str], Path], work: Path) -> tuple[list[Path], list[Path], dict]:
    """Curate problems from the configured sources in bounded memory (plain function, no Prefect):
    (problems part files, rejected part files, summary), the parts written under ``work``.

    Pass 1 reads every source row by row, validates it, drops duplicates (a dict of ids and first
    answers) and writes the accepted problems, split assigned, with their input rows, in parts.
    With decontamination, pass 2 indexes the eval problems' informative n-grams (64-bit keys) and
    pass 3 checks each train problem against that index while copying the parts to the output;
    template n-grams come from up to ``TEMPLATE_SAMPLE`` questions per source."""
    import heapq

    accepted, rejected = _Parts(work, "accepted", "problems"), _Parts(work, "rejected", "rejected")
    seen: dict[str, tuple[str, str]] = {}  # problem_id -> (answer, source) of its first occurrence
    per_source: dict[str, Counter] = defaultdict(Counter)
    reasons: Counter = Counter()
    n = cfg.decontamination.ngram
    samples: dict[str, list] = defaultdict(list)  # per source: a max-heap (by id) of its lowest-id questions' tokens
    accepted_by_source: Counter = Counter()

    for i, src in enumerate(cfg.sources):
        name = _source_name(src)
        source_reasons: Counter = Counter()
        accepted_before = accepted.count
        for row in progress.track(read_source(src, resolve), f"curate: reading {name}"):
            per_source[name]["read"] += 1
            prob, reason = _validate(row, src, cfg.max_question_chars)
            if prob is not None:
                first = seen.get(prob["problem_id"])
                if first is not None:
                    if first[0] == prob["answer"]:
                        reason = f"duplicate: same question and answer as problem {prob['problem_id']} ({first[1]})"
                    else:
                        reason = (
                            f"conflicting_duplicate: same question as problem {prob['problem_id']} ({first[1]}) "
                            f"with a different answer ({prob['answer']!r} there: {first[0]!r})"
                        )
            if reason is not None:
                rejected.add(_reject(row, reason))
                per_source[name]["rejected"] += 1
                reasons[reason.split(":", 1)[0]] += 1
                source_reasons[reason.split(":", 1)[0]] += 1
                continue
            pid = prob["problem_id"]
            seen[pid] = (prob["answer"], prob["source"])
            prob["split"] = prob["split"] or _split_of(pid, cfg.split_seed, cfg.eval_fraction)
            accepted_by_source[prob["source"]] += 1
            if cfg.decontamination.enabled:
                heap = samples[prob["source"]]
                item = (-int(pid, 16), _tokens(prob["question"]))
                if len(heap) < TEMPLATE_SAMPLE:
                    heapq.heappush(heap, item)
                elif item[0] > heap[0][0]:  # a lower id than the highest kept
                    heapq.heapreplace(heap, item)
            accepted.add({**prob, _ROW_COL: _reject(row, "")["row"]})
        if accepted.count == accepted_before and not src.allow_empty:  # a nightly run must not "succeed" on nothing
            why = ", ".join(f"{k}: {v}" for k, v in sorted(source_reasons.items())) or "no rows"
            raise SourceError(f"problems.sources.{i} ({name}): yields no problems — {per_source[name]['read']} rows read, "
                              f"{per_source[name]['rejected']} rejected ({why}); fix the source, or set "
                              f"problems.sources.{i}.allow_empty: true to accept it")
    del seen
    parts = accepted.close()

    dc = cfg.decontamination
    template = _templates(samples, accepted_by_source, dc) if dc.enabled else {}
    del samples
    eval_index: dict[int, str] = {}
    if dc.enabled:
        for p in _read_parts(parts, ["problem_id", "question", "source", "split"]):
            if p["split"] == "eval":
                for g in _informative_ngrams(_tokens(p["question"]), template[p["source"]], n):
                    eval_index.setdefault(_gram_key(g), p["problem_id"])

    problems = _Parts(work, "problems", "problems")
    split_counts, by_level, with_reference, contaminated = Counter(), Counter(), 0, 0
    for p in progress.track(_read_parts(parts), "curate: decontaminating" if eval_index else "curate: writing", total=accepted.count):
        input_row = p.pop(_ROW_COL)
        if eval_index and p["split"] == "train":
            informative = _informative_ngrams(_tokens(p["question"]), template[p["source"]], n)
            hits = [eval_index[k] for k in map(_gram_key, informative) if k in eval_index]
            frac = len(hits) / len(informative) if informative else 0.0
            if informative and frac >= dc.threshold:
                top = Counter(hits).most_common(1)[0][0]
                rejected.add({"source": p["source"], "row": input_row,
                              "reason": f"contaminated: {frac:.2f} of its {n}-grams occur in the eval split (most with eval problem {top})"})
                per_source[p["source"]]["rejected"] += 1
                contaminated += 1
                continue
        problems.add(p)
        per_source[p["source"]][p["split"]] += 1
        split_counts[p["split"]] += 1
        by_level[f"{p['split']}/{p['level']}"] += 1
        with_reference += p["reference_solution"] is not None
    if contaminated:
        reasons["contaminated"] += contaminated
    for path in parts:
        path.unlink()
    summary = {
        "problems": problems.count,
        "train": split_counts.get("train", 0),
        "eval": split_counts.get("eval", 0),
        "rejected": rejected.count,
        "rejected_by_reason": dict(sorted(reasons.items())),
        "by_source": {k: dict(v) for k, v in per_source.items()},
        "by_level": dict(sorted(by_level.items())),
        "with_reference_solution": with_reference,
    }
    return problems.close(), rejected.close(), summary


def curate(cfg: ProblemsConfig, resolve: Callable[[str], Path] = Path) -> CurationResult:
    """``curate_parts`` with its rows read back as lists (for small sets: tests, the quickstart's scale)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="guidedrl-curate-") as work:
        problems, rejected, summary = curate_parts(cfg, resolve, Path(work))
        return CurationResult(list(_read_parts(problems)), list(_read_parts(rejected)), summary)


# --------------------------------------------------------------------------- the stage


def input_fingerprints(cfg: ProblemsConfig, resolve: Callable[[str], Path] = Path) -> dict[str, str]:
    """What the stage reads, fingerprinted: file bytes, generator package versions."""
    fps = {}
    for i, src in enumerate(cfg.sources):
        if src.kind == "file":
            path = resolve(src.file)
            if not path.is_file():
                raise SourceError(f"{path}: problem file not found (problems.sources.{i}.file)")
            fps[f"sources.{i}"] = fingerprint_files([path])
        elif src.kind == "hf":
            if src.hf.path:
                root = resolve(src.hf.path)
                files = [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else []
                if not files:
                    raise SourceError(f"{root}: no Hugging Face dataset saved here (problems.sources.{i}.hf.path)")
                fps[f"sources.{i}"] = fingerprint_files(files, root=root)
            else:
                names = [src.hf.data_files] if isinstance(src.hf.data_files, str) else src.hf.data_files
                files = [Path(p) for f in names for p in sorted(glob.glob(str(resolve(f))))]
                if not files:
                    raise SourceError(f"{names}: data files not found (problems.sources.{i}.hf.data_files)")
                fps[f"sources.{i}"] = fingerprint_files(files, root=None)
        else:
            fps[f"sources.{i}"] = f"reasoning-gym=={metadata.version('reasoning-gym')}"
    return fps


def _check_utf8(path: Path) -> None:
    """The whole file decodes as UTF-8 (read in chunks; a byte-order mark is fine)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def preflight(config) -> None:
    """Before any work: every file source exists, reads in its format (text as UTF-8, Parquet
    with a footer) and has the columns its mapping names. hf and reasoning_gym sources are read
    by the stage."""
    import pyarrow.parquet as pq

    for i, src in enumerate(config.problems.sources):
        if src.kind != "file":
            continue
        path = config.resolve(src.file)
        if not path.is_file():
            raise SourceError(f"{path}: problem file not found (problems.sources.{i}.file)")
        fmt = _file_format(src, path)
        if fmt == "parquet":
            try:
                names = pq.ParquetFile(path).schema_arrow.names
            except Exception as exc:  # pyarrow raises several types for a bad file
                raise SourceError(f"{path}: cannot be read as Parquet ({exc}) (problems.sources.{i}.file)") from None
            _check_columns(names, src, str(path))
            continue
        _check_utf8(path)
        first = next((rec for rec, err in _read_text_records(path, fmt) if err is None), None)
        if first is not None:
            _check_columns(list(first), src, str(path))


def settings(config) -> dict:
    return config.problems.model_dump(mode="json")


def inputs(config, upstream: dict[str, StageOutput] | None = None) -> dict:
    return input_fingerprints(config.problems, config.resolve)


def compute(job: Job) -> StageOutput:
    with job.scratch() as work:
        problems, rejected, s = curate_parts(job.config.problems, job.config.resolve, work)
        if not s["train"] and not all(src.allow_empty for src in job.config.problems.sources):  # nothing to train on is no success
            raise SourceError(f"problems: no train problems after curation — {s['problems']} problems ({s['eval']} eval), "
                              f"{s['rejected']} rejected {s['rejected_by_reason']}; lower problems.eval_fraction, add sources, "
                              "or set allow_empty: true on every source to accept it")
        out = job.write(
            {"problems": problems, "rejected": rejected},
            s,
            dataset_summaries={
                "problems": {k: s[k] for k in ("problems", "train", "eval", "by_level", "with_reference_solution")},
                "rejected": {k: s[k] for k in ("rejected", "rejected_by_reason")},
            },
        )
    log.info(
        "curate: %d problems (%d train, %d eval), %d rejected %s -> %s",
        s["problems"], s["train"], s["eval"], s["rejected"], s["rejected_by_reason"] or "", out.path,
    )
    return out


def describe(s: dict) -> str:
    reasons = ", ".join(f"{k}: {v}" for k, v in s.get("rejected_by_reason", {}).items())
    return f"{s.get('problems')} problems ({s.get('train')} train, {s.get('eval')} eval); {s.get('rejected')} rejected" + (f" ({reasons})" if reasons else "")
