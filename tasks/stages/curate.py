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

Rows move a frame at a time (polars DataFrames; a JSONL block parsed by polars where it is plain), and the checks are
polars expressions, Python only for the rare rows they cannot take exactly: at 1M problems the stage runs at 1.3x a
bare polars pass of the same steps (bench/scale.py --steps curate).

Split along its seams: the sources and their reading in _curate_sources.py, the checks on rows and questions
(normalisation, ids, split, n-grams, validation) in _curate_checks.py; here the settings, the three-pass driver and
the stage.
"""

from __future__ import annotations

import glob
import itertools
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

import polars as pl
from pydantic import Field

from tasks.core import progress
from tasks.core.config import StrictModel
from tasks.core.parts import PartWriter
from tasks.core.schemas import conform, to_table
from tasks.core.stage import Job, Stage
from tasks.core.store import StageOutput, fingerprint_files, iter_batches
from tasks.stages._curate_checks import (informative, key_texts, normalize_text, problem_id, problem_ids,  # noqa: F401
                                         rejected_rows, splits, template_grams, tokens, validate_frame)
from tasks.stages._curate_sources import (SourceConfig, SourceError, _check_columns, _file_format, _not_utf8, _read_text_records,
                                          _source_name, read_frames)

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
#: the columns that carry each accepted problem's input row and its question's key text (``key_texts``: what its id
#: hashes and its n-grams are cut from) until decontamination is done
_ROW_COL, _KEY_COL = "_input_row", "_key"
#: rows per batch when parts are read back as rows
_READ_ROWS = 65_536


def _parts(work: Path, name: str, kind: str) -> PartWriter:
    """Frames of ``kind`` written to Parquet parts of ``PART_ROWS`` as they come (at least one part, maybe empty)."""
    return PartWriter(work, name, max_rows=PART_ROWS, at_least_one=True, to_table=lambda rows: to_table(rows, kind, f"curate/{name}"))


def _add(writer: PartWriter, frame: pl.DataFrame, kind: str) -> None:
    if frame.height:
        writer.add(conform(frame.to_arrow(), kind, f"curate/{writer.name}"))


class _Scratch:
    """The accepted problems between the passes: one Parquet file a frame (lz4, not flushed: a crash starts the stage
    over), read back a file at a time."""

    def __init__(self, work: Path):
        self.work, self.paths, self.count = work, [], 0

    def add(self, frame: pl.DataFrame) -> None:
        path = self.work / f"accepted-{len(self.paths):05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.write_parquet(path, compression="lz4", statistics=False)
        self.paths.append(path)
        self.count += frame.height

    def frames(self, columns: list[str] | None = None) -> Iterator[pl.DataFrame]:
        for path in self.paths:
            yield pl.read_parquet(path, columns=columns)

    def remove(self) -> None:
        for path in self.paths:
            path.unlink()


def _read_parts(paths: list[Path]) -> Iterator[dict]:
    for batch in iter_batches(paths, _READ_ROWS):
        yield from batch.to_pylist()


def _duplicates(ids: list[str], answers: list[str], source: str, seen: dict[str, tuple[str, str]]) -> list[str | None]:
    """Per problem of a frame, why it is a duplicate of one seen before (None: first seen, now remembered). Only the
    ids seen before or twice in the frame are looked at one by one; the others are remembered at once."""
    frame_ids = set(ids)
    out: list[str | None] = [None] * len(ids)
    if len(frame_ids) == len(ids) and seen.keys().isdisjoint(frame_ids):
        seen.update(zip(ids, zip(answers, itertools.repeat(source))))
        return out
    for i, (pid, answer) in enumerate(zip(ids, answers)):
        first = seen.get(pid)
        if first is None:
            seen[pid] = (answer, source)
        elif first[0] == answer:
            out[i] = f"duplicate: same question and answer as problem {pid} ({first[1]})"
        else:
            out[i] = (f"conflicting_duplicate: same question as problem {pid} ({first[1]}) "
                      f"with a different answer ({answer!r} there: {first[0]!r})")
    return out


def _lowest(sample: pl.DataFrame | None, frame: pl.DataFrame) -> pl.DataFrame:
    """The ``TEMPLATE_SAMPLE`` questions of lowest id among a source's sample so far and a frame of its problems."""
    new = frame.select("problem_id", _KEY_COL)
    both = new if sample is None else pl.concat([sample, new])
    return both.sort("problem_id").head(TEMPLATE_SAMPLE) if both.height > TEMPLATE_SAMPLE else both


def _informative_by_source(frame: pl.DataFrame, template: dict[str, pl.Series], n: int) -> pl.DataFrame:
    """(`row` in ``frame``, `h`) of each problem's informative n-grams, its source's template cut out."""
    out = []
    for (source,), part in frame.select("source", _KEY_COL).with_row_index("_in_frame").group_by("source", maintain_order=True):
        grams = informative(tokens(part[_KEY_COL]), n, template.get(source))
        out.append(grams.join(part.select(pl.int_range(pl.len(), dtype=pl.UInt32).alias("row"), "_in_frame"), on="row")
                   .select(pl.col("_in_frame").alias("row"), "h"))
    return pl.concat(out) if out else pl.DataFrame(schema={"row": pl.UInt32, "h": pl.UInt64})


def curate_parts(cfg: ProblemsConfig, resolve: Callable[[str], Path], work: Path) -> tuple[list[Path], list[Path], dict]:
    """Curate problems from the configured sources in bounded memory (plain function, no Prefect):
    (problems part files, rejected part files, summary), the parts written under ``work``.

    Pass 1 reads every source a frame of rows at a time, validates it, drops duplicates (a dict of ids
    and first answers) and writes the accepted problems, split assigned, with their input rows, in parts.
    With decontamination, pass 2 indexes the eval problems' informative n-grams (64-bit keys) and
    pass 3 checks each train problem against that index while copying the parts to the output;
    template n-grams come from up to ``TEMPLATE_SAMPLE`` questions per source."""
    accepted, rejected = _Scratch(work), _parts(work, "rejected", "rejected")
    seen: dict[str, tuple[str, str]] = {}  # problem_id -> (answer, source) of its first occurrence
    per_source: dict[str, Counter] = defaultdict(Counter)
    reasons: Counter = Counter()
    dc, n = cfg.decontamination, cfg.decontamination.ngram
    samples: dict[str, pl.DataFrame] = {}  # per source: its lowest-id questions
    accepted_by_source: Counter = Counter()

    for i, src in enumerate(cfg.sources):
        name = _source_name(src)
        source_reasons: Counter = Counter()
        accepted_before = accepted.count
        for frame in progress.track(read_frames(src, resolve), f"curate: reading {name}", size=len):
            per_source[name]["read"] += frame.height
            checked = validate_frame(frame, src, name, cfg.max_question_chars)
            usable = checked["reason"].is_null()
            good = checked.filter(usable)
            keys = key_texts(good["question"])
            good = good.with_columns(problem_id=problem_ids(keys), **{_KEY_COL: keys})
            dup = _duplicates(good["problem_id"].to_list(), good["answer"].to_list(), name, seen)
            reason = checked["reason"].scatter(usable.arg_true(), pl.Series(dup, dtype=pl.String)) if good.height else checked["reason"]
            bad = checked.with_columns(reason=reason).filter(pl.col("reason").is_not_null())
            if bad.height:
                _add(rejected, rejected_rows(name, bad["row"].to_list(), bad["reason"].to_list()), "rejected")
                codes = bad["reason"].str.split_exact(":", 1).struct.field("field_0").value_counts()
                for code, count in codes.iter_rows():
                    reasons[code] += count
                    source_reasons[code] += count
                per_source[name]["rejected"] += bad.height
            new = good.filter(pl.Series(dup, dtype=pl.String).is_null())
            if not new.height:
                continue
            ids = new["problem_id"].to_list()
            new = new.with_columns(split=pl.col("split").fill_null(pl.Series(splits(ids, cfg.split_seed, cfg.eval_fraction), dtype=pl.String)))
            accepted_by_source[name] += new.height
            if dc.enabled:
                samples[name] = _lowest(samples.get(name), new)
            accepted.add(new.drop("reason").rename({"row": _ROW_COL}))
        if accepted.count == accepted_before and not src.allow_empty:  # a nightly run must not "succeed" on nothing
            why = ", ".join(f"{k}: {v}" for k, v in sorted(source_reasons.items())) or "no rows"
            raise SourceError(f"problems.sources.{i} ({name}): yields no problems — {per_source[name]['read']} rows read, "
                              f"{per_source[name]['rejected']} rejected ({why}); fix the source, or set "
                              f"problems.sources.{i}.allow_empty: true to accept it")
    del seen

    template: dict[str, pl.Series] = {}
    eval_index = None  # n-gram key -> the first eval problem with it, and that problem's place in the parts
    if dc.enabled:
        for source, sample in samples.items():  # n-grams in more than template_fraction of a source's questions; none under 10
            if accepted_by_source[source] >= 10:
                template[source] = template_grams(tokens(sample[_KEY_COL]), n, dc.template_fraction, sample.height)
        del samples
        found, at = [], 0
        for frame in accepted.frames(["problem_id", _KEY_COL, "source", "split"]):
            ev = frame.with_row_index("order", offset=at).filter(pl.col("split") == "eval")
            at += frame.height
            if ev.height:
                grams = _informative_by_source(ev, template, n)
                found.append(grams.join(ev.select(pl.int_range(pl.len(), dtype=pl.UInt32).alias("row"), "problem_id", "order"), on="row").drop("row"))
        if found:
            eval_index = pl.concat(found).sort("order").unique(subset="h", keep="first", maintain_order=True)
            eval_index = eval_index if eval_index.height else None

    problems = _parts(work, "problems", "problems")
    split_counts, by_level, with_reference, contaminated = Counter(), Counter(), 0, 0
    what = "curate: decontaminating" if eval_index is not None else "curate: writing"
    for frame in progress.track(accepted.frames(), what, total=accepted.count, size=len):
        if eval_index is not None:
            hit = _contaminated(frame, eval_index, template, n, dc.threshold)
            if hit.height:
                rows = frame.with_row_index("at").join(hit, on="at", maintain_order="left")
                _add(rejected, rejected_rows("", rows[_ROW_COL].to_list(), rows["reason"].to_list()).with_columns(source=rows["source"]), "rejected")
                for source, count in rows["source"].value_counts().iter_rows():
                    per_source[source]["rejected"] += count
                contaminated += hit.height
                frame = frame.with_row_index("at").join(hit, on="at", how="anti", maintain_order="left").drop("at")
        frame = frame.drop(_ROW_COL, _KEY_COL)
        _add(problems, frame, "problems")
        for source, split, count in frame.group_by("source", "split", maintain_order=True).len().iter_rows():
            per_source[source][split] += count
            split_counts[split] += count
        for split, level, count in frame.group_by("split", "level").len().iter_rows():
            by_level[f"{split}/{level}"] += count
        with_reference += frame["reference_solution"].is_not_null().sum()
    if contaminated:
        reasons["contaminated"] += contaminated
    accepted.remove()
    summary = {
        "problems": problems.count,
        "train": split_counts.get("train", 0),
        "eval": split_counts.get("eval", 0),
        "rejected": rejected.count,
        "rejected_by_reason": dict(sorted(reasons.items())),
        "by_source": {k: dict(v) for k, v in per_source.items()},
        "by_level": dict(sorted(by_level.items())),
        "with_reference_solution": int(with_reference),
    }
    return problems.close(), rejected.close(), summary


def _contaminated(frame: pl.DataFrame, eval_index: pl.DataFrame, template: dict[str, pl.Series], n: int, threshold: float) -> pl.DataFrame:
    """The train problems of a frame whose informative n-grams are ``threshold`` or more in the eval index: `at` (their
    row in ``frame``) and `reason`, naming the eval problem that shares the most of them (the first read, on a tie)."""
    train = frame.with_row_index("at").filter(pl.col("split") == "train")
    if not train.height:
        return pl.DataFrame(schema={"at": pl.UInt32, "reason": pl.String})
    grams = _informative_by_source(train, template, n).join(eval_index, on="h", how="left")
    per_row = grams.group_by("row").agg(pl.col("h").n_unique().alias("informative"),
                                        pl.col("h").filter(pl.col("problem_id").is_not_null()).n_unique().alias("hits"))
    per_row = per_row.with_columns(frac=pl.col("hits") / pl.col("informative")).filter(pl.col("frac") >= threshold)
    if not per_row.height:
        return pl.DataFrame(schema={"at": pl.UInt32, "reason": pl.String})
    top = (grams.drop_nulls("problem_id").join(per_row.select("row"), on="row", how="semi")
           .group_by("row", "problem_id").agg(pl.col("h").n_unique().alias("shared"), pl.col("order").first())
           .sort(["row", "shared", "order"], descending=[False, True, False]).group_by("row", maintain_order=True).first())
    rows = per_row.join(top.select("row", pl.col("problem_id").alias("top")), on="row").sort("row")
    ats = train["at"].gather(rows["row"])
    return pl.DataFrame({"at": ats, "reason": [f"contaminated: {f:.2f} of its {n}-grams occur in the eval split (most with eval problem {t})"
                                               for f, t in zip(rows["frac"].to_list(), rows["top"].to_list())]},
                        schema={"at": pl.UInt32, "reason": pl.String})


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
