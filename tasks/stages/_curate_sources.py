"""Stage `curate`'s sources: their settings (a file, a Hugging Face dataset on local disk, a reasoning-gym generator),
and reading each into frames of rows (``read_frames``: polars DataFrames of ``FRAME_SCHEMA``, every value as text, as
``_as_text`` makes it). A row that cannot be used carries its error (it goes to `rejected`); a source that cannot be
read at all is a ``SourceError`` naming the file.

JSONL files are parsed by polars a block of lines at a time where a block is plain (every line one JSON object, the
contract's columns text or integers, no other columns); any other block, and every other format, is read record by
record in Python — the same rows either way (tests/test_curate.py compares the two)."""

from __future__ import annotations

import csv
import glob
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from pydantic import Field, model_validator

from tasks.core.config import StrictModel
from tasks.models.answers import chain_sum_reference


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


class SourceError(ValueError):
    """A problem source that cannot be read at all; the message names the file."""


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


def _jsonl_records(lines: Iterator[str], first_line: int) -> Iterator[tuple[dict | None, str | None]]:
    """(record, None) for each JSON object line, (what the line was, error) for any other; blank lines skipped."""
    for lineno, line in enumerate(lines, first_line):
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


def _read_text_records(path: Path, fmt: str) -> Iterator[tuple[dict | None, str | None]]:
    if fmt == "jsonl":
        with open(path, encoding="utf-8-sig") as fh:
            yield from _jsonl_records(fh, 1)
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

        try:  # a record batch at a time: a source of millions of rows is never held whole
            pf = pq.ParquetFile(path)
            for batch in pf.iter_batches(batch_size=4096):
                yield from ((rec, None) for rec in batch.to_pylist())
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise SourceError(f"{path}: cannot be read as Parquet ({exc})") from None


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


def _rows_from_records(records: Iterator[tuple[dict | None, str | None]], src: SourceConfig, name: str, where: str,
                       checked: bool = False) -> Iterator[_Row]:
    """Rows of records; the first record's columns checked against the mapping unless ``checked`` already."""
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


# --------------------------------------------------------------------------- rows as frames

#: the contract fields a source's column mapping names
FIELDS = ("question", "answer", "reference_solution", "level", "split")
#: what ``read_frames`` yields: each contract field as text (``_as_text``; null when missing or not text),
#: the type of a question/answer that is neither text nor a number, a row-level read error, the row's
#: `metadata` JSON, and the input row as JSON text (for `rejected`: ``canonical_row`` makes its final form)
FRAME_SCHEMA = {"index": "Int64", **{f: "String" for f in FIELDS}, "question_type": "String", "answer_type": "String",
                "error": "String", "metadata": "String", "row": "String"}
#: rows per frame (records read in Python) and bytes per block (JSONL read by polars)
FRAME_ROWS = 65_536
BLOCK_BYTES = 16 << 20
#: JSONL blocks parsed by polars where plain (False: every row read in Python, as the tests compare)
POLARS_JSONL = True


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


def canonical_row(text: str) -> str:
    """An input row's JSON text as `rejected` stores it (keys sorted); idempotent."""
    return json.dumps(json.loads(text), sort_keys=True, default=str)


def _frame(columns: dict[str, list]):
    import polars as pl

    return pl.DataFrame(columns, schema={k: getattr(pl, v) for k, v in FRAME_SCHEMA.items()})


def _frames_of_rows(rows: Iterator[_Row]) -> Iterator:
    """Rows read in Python, as frames of ``FRAME_ROWS``."""
    cols: dict[str, list] = {k: [] for k in FRAME_SCHEMA}
    for row in rows:
        cols["index"].append(row.index)
        for name in FIELDS:
            value = getattr(row, name)
            text = _as_text(value)
            cols[name].append(text)
            if name in ("question", "answer"):
                cols[f"{name}_type"].append(type(value).__name__ if text is None and value is not None else None)
        cols["error"].append(row.error)
        cols["metadata"].append(json.dumps({"source_index": row.index, **row.metadata}, sort_keys=True, default=str))
        cols["row"].append(json.dumps(row.data, sort_keys=True, default=str))
        if len(cols["index"]) >= FRAME_ROWS:
            yield _frame(cols)
            cols = {k: [] for k in FRAME_SCHEMA}
    if cols["index"]:
        yield _frame(cols)


def _plain_block(lines, src: SourceConfig, first_index: int):
    """A block's non-blank JSONL lines (a polars Series) as one frame, parsed by polars — or None where the block is not
    plain: a line that is not one JSON object, a column beside the mapped ones (its values go to `metadata` as Python
    reads them), a contract column holding anything but text or integers, a key given twice."""
    import polars as pl

    if not lines.str.contains(r"^[ \t\r]*\{").all():
        return None
    try:
        df = pl.read_ndjson(io.BytesIO(lines.str.join("\n").item().encode()), infer_schema_length=None)
    except Exception:  # anything polars cannot parse is read line by line, with the line's own error
        return None
    mapped = {src.columns.get(f, f): f for f in FIELDS}
    if df.height != len(lines) or not set(df.columns) <= set(mapped):
        return None
    out = {"index": pl.int_range(first_index, first_index + len(lines), eager=True)}
    for col, name in mapped.items():
        if col not in df.columns:
            out[name] = pl.repeat(None, len(lines), dtype=pl.String, eager=True)
            continue
        values, key = df[col], f'"{col}"' if col.isidentifier() else None
        if key is None or lines.str.count_matches(key + r"\s*:").max() > 1:  # a key given twice: Python keeps the last
            return None
        if values.dtype == pl.String:  # polars writes a number or a list met in a text column as text: refuse those
            if lines.str.contains(key + r'\s*:\s*[^"\sn]').any():  # (n: null)
                return None
        elif values.dtype not in (pl.Int64, pl.Boolean, pl.Null):  # floats (2 vs 2.0), big integers, nested values
            return None
        out[name] = values.cast(pl.String)
    return pl.DataFrame(out).with_columns(
        question_type=pl.lit(None, pl.String), answer_type=pl.lit(None, pl.String), error=pl.lit(None, pl.String),
        metadata=pl.concat_str(pl.lit('{"source_index": '), pl.col("index").cast(pl.String), pl.lit("}")),
        row=lines).select(list(FRAME_SCHEMA))


def _jsonl_frames(src: SourceConfig, path: Path) -> Iterator:
    """A JSONL file a block of lines at a time: a plain block parsed by polars, any other read line by line in Python
    (the same rows, errors and line numbers as ``_jsonl_records``)."""
    import polars as pl

    index, lineno, rest = 0, 1, b""
    with open(path, "rb") as fh:
        first = True
        while True:
            chunk = fh.read(BLOCK_BYTES)
            data = rest + chunk
            if first:
                data, first = data.removeprefix(b"\xef\xbb\xbf"), False
            cut = data.rfind(b"\n") + 1 if chunk else len(data)
            block, rest = data[:cut], data[cut:]
            if block:
                try:
                    text = block.decode("utf-8")
                except UnicodeDecodeError:
                    raise _not_utf8(path) from None
                lines = pl.Series("row", [text]).str.split("\n").explode()
                lines = lines.head(-1) if text.endswith("\n") else lines
                nonblank = lines.filter(lines.str.strip_chars(" \t\n\r\x0b\x0c") != "")  # (blank as bytes.strip says)
                lone_cr = block.count(b"\r") != block.count(b"\r\n")  # a line end to `open`, not to polars
                frame = _plain_block(nonblank, src, index) if len(nonblank) and not lone_cr else None
                if frame is None:  # line by line, as text with universal newlines as `open` reads it
                    text_lines = list(io.StringIO(text, newline=None))
                    records = list(_jsonl_records(iter(text_lines), lineno))
                    yield from _frames_of_rows(_rows_of(records, src, _source_name(src), str(path), index))
                    index += len(records)
                    lineno += len(text_lines)
                else:
                    yield frame
                    index += frame.height
                    lineno += len(lines)
            if not chunk:
                return


def _rows_of(records, src: SourceConfig, name: str, where: str, first_index: int) -> Iterator[_Row]:
    for row in _rows_from_records(iter(records), src, name, where, checked=True):
        row.index += first_index
        yield row


def read_frames(src: SourceConfig, resolve: Callable[[str], Path] = Path) -> Iterator:
    """A source's rows as frames of ``FRAME_SCHEMA`` (the first record's columns checked against the mapping)."""
    if src.kind == "file":
        path = resolve(src.file)
        if _file_format(src, path) == "jsonl" and path.is_file() and POLARS_JSONL:
            first = next((rec for rec, err in _read_records(path, "jsonl") if err is None), None)
            if first is not None:
                _check_columns(list(first), src, str(path))
            return _jsonl_frames(src, path)
    return _frames_of_rows(read_source(src, resolve))
