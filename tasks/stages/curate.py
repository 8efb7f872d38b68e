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

Split along its seams: the sources and their reading in _curate_sources.py, the checks on rows and questions
(normalisation, ids, split, n-grams, validation) in _curate_checks.py; here the settings, the three-pass driver and
the stage.
"""

from __future__ import annotations

import glob
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

from pydantic import Field

from tasks.core import progress
from tasks.core.config import StrictModel
from tasks.core.parts import PartWriter
from tasks.core.schemas import to_table
from tasks.core.stage import Job, Stage
from tasks.core.store import StageOutput, fingerprint_files, iter_batches
from tasks.stages._curate_checks import (_informative_ngrams, _reject, _split_of, _tokens, _validate, _windows,  # noqa: F401
                                         normalize_text, problem_id)
from tasks.stages._curate_sources import (SourceConfig, SourceError, _check_columns, _file_format, _not_utf8, _read_text_records,
                                          _source_name, read_source)

# (normalize_text, problem_id and SourceError are taken from here by the CLI and the tests: the stage's names)

# --------------------------------------------------------------------------- settings (config section `problems`)


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


# --------------------------------------------------------------------------- the method


@dataclass
class CurationResult:
    problems: list[dict]
    rejected: list[dict]
    summary: dict


#: rows per Parquet part while curating (problems and rejected rows are written as they come)
PART_ROWS = 8192
#: per source, the questions (the lowest ids, ids being hashes: an even sample) whose n-grams estimate
#: its template text; a source with no more questions is counted whole, as before
TEMPLATE_SAMPLE = 20_000
#: the column that carries each accepted problem's input row until decontamination is done
_ROW_COL = "_input_row"


def _parts(work: Path, name: str, kind: str) -> PartWriter:
    """Rows of ``kind`` written to Parquet parts of ``PART_ROWS`` as they come (at least one part, maybe empty)."""
    return PartWriter(work, name, max_rows=PART_ROWS, at_least_one=True, to_table=lambda rows: to_table(rows, kind, f"curate/{name}"))


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

    accepted, rejected = _parts(work, "accepted", "problems"), _parts(work, "rejected", "rejected")
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
                rejected.add_row(_reject(row, reason))
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
            accepted.add_row({**prob, _ROW_COL: _reject(row, "")["row"]})
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

    problems = _parts(work, "problems", "problems")
    split_counts, by_level, with_reference, contaminated = Counter(), Counter(), 0, 0
    for p in progress.track(_read_parts(parts), "curate: decontaminating" if eval_index else "curate: writing", total=accepted.count):
        input_row = p.pop(_ROW_COL)
        if eval_index and p["split"] == "train":
            informative = _informative_ngrams(_tokens(p["question"]), template[p["source"]], n)
            hits = [eval_index[k] for k in map(_gram_key, informative) if k in eval_index]
            frac = len(hits) / len(informative) if informative else 0.0
            if informative and frac >= dc.threshold:
                top = Counter(hits).most_common(1)[0][0]
                rejected.add_row({"source": p["source"], "row": input_row,
                              "reason": f"contaminated: {frac:.2f} of its {n}-grams occur in the eval split (most with eval problem {top})"})
                per_source[p["source"]]["rejected"] += 1
                contaminated += 1
                continue
        problems.add_row(p)
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
