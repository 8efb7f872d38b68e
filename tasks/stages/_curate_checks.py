"""Stage `curate`'s checks on rows and questions, a frame of rows at a time (polars expressions; Python only for the
rare rows the expressions cannot take exactly): text normalisation and the stable `problem_id`, each row's validation
(a reason for every rejected row), the deterministic train/eval split, and the word n-grams that decontamination
compares.

"Plain" text — printable ASCII, tabs and line ends — is normalised, keyed and tokenised by polars; any other text by
``normalize_text``, ``_key_text`` and ``_TOKEN`` in Python, which define what the expressions compute."""

from __future__ import annotations

import hashlib
import re
import unicodedata

import polars as pl

from tasks.stages._curate_sources import SourceConfig, canonical_row

_WS = re.compile(r"[ \t\f\v\u00a0]+")
_TOKEN = re.compile(r"\w+|[^\w\s]")
_SPACES = re.compile(r"\s+")
_BLANK_LINES = re.compile(r"\n{3,}")
#: text the polars expressions below treat exactly as the Python functions do
_PLAIN = r"^[\t\n\x0b\x0c\r\x20-\x7e]*$"
#: between an n-gram's tokens in its key (never inside a token: Python's \s matches it)
_SEP = "\x1f"


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
    return _id_of_key(_key_text(normalize_text(question)))


def _id_of_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _split_of(pid: str, seed: int, eval_fraction: float) -> str:
    u = int(hashlib.sha256(f"{seed}:{pid}".encode()).hexdigest()[:12], 16) / float(1 << 48)
    return "eval" if u < eval_fraction else "train"


def _by_rows(texts: pl.Series, expr: pl.Expr, python) -> pl.Series:
    """``expr`` over plain texts, ``python`` over the others (nulls stay null)."""
    out = texts.to_frame("t").select(expr.alias(texts.name)).to_series()
    other = (~texts.str.contains(_PLAIN)).fill_null(False)
    if other.any():
        idx = other.arg_true()
        out = out.scatter(idx, pl.Series([python(t) for t in texts.gather(idx).to_list()], dtype=pl.String))
    return out


def normalized(texts: pl.Series) -> pl.Series:
    """``normalize_text`` of every text of a column."""
    t = pl.col("t")
    expr = (t.str.replace_all("\r\n", "\n", literal=True).str.replace_all("\r", "\n", literal=True)
            .str.replace_all(r"[ \t\x0b\x0c]+", " ").str.replace_all(" \n", "\n", literal=True)
            .str.replace_all(r"\n{3,}", "\n\n").str.strip_chars())
    return _by_rows(texts, expr, normalize_text)


def key_texts(questions: pl.Series) -> pl.Series:
    """``_key_text`` of every normalised question (plain normalised text has single spaces but across line ends: only
    the questions of several lines need the regex)."""
    keys = _by_rows(questions, pl.col("t").str.to_lowercase(), _key_text)
    lines = (questions.str.contains("\n", literal=True) & questions.str.contains(_PLAIN)).fill_null(False)
    if lines.any():
        idx = lines.arg_true()
        keys = keys.scatter(idx, keys.gather(idx).str.replace_all(r"\s+", " "))
    return keys


def problem_ids(keys: pl.Series) -> pl.Series:
    """The `problem_id` of every question, from its ``key_texts``."""
    return pl.Series([_id_of_key(k) for k in keys.to_list()], dtype=pl.String)


# --------------------------------------------------------------------------- validation


def validate_frame(frame: pl.DataFrame, src: SourceConfig, source: str, max_chars: int) -> pl.DataFrame:
    """A frame of read rows (``_curate_sources.FRAME_SCHEMA``) checked: the `problems` columns of each row, its input
    row (`row`) and `reason` — null for a usable row, else why it is rejected (the first check it fails, in order:
    unparseable, bad_type, empty_question, too_long, bad_type, no_answer, bad_split). `problem_id` is left to the
    caller (for the usable rows only); `split` is null where the split is left to the id."""
    q, a = normalized(frame["question"]), normalized(frame["answer"])
    ref = frame["reference_solution"]
    ref = pl.Series([None] * len(ref), dtype=pl.String) if ref.null_count() == len(ref) else normalized(ref.replace("", None))
    level = src.level or (src.reasoning_gym.level if src.reasoning_gym else None)
    split = pl.lit(src.split) if src.split else pl.col("split").replace("", None)
    checked = frame.with_columns(q=q, a=a, ref=ref).with_columns(
        split=split,
        level=pl.lit(level, pl.String) if level else pl.col("level").replace("", None),
    ).with_columns(
        code=pl.when(pl.col("error").is_not_null()).then(pl.lit("unparseable"))
        .when(pl.col("question_type").is_not_null()).then(pl.lit("bad_type_question"))
        .when(pl.col("q").fill_null("") == "").then(pl.lit("empty_question"))
        .when(pl.col("question").str.len_chars() > max_chars).then(pl.lit("too_long"))
        .when(pl.col("answer_type").is_not_null()).then(pl.lit("bad_type_answer"))
        .when(pl.col("a").fill_null("") == "").then(pl.lit("no_answer"))
        .when(pl.col("split").is_not_null() & ~pl.col("split").is_in(["train", "eval"])).then(pl.lit("bad_split"))
    )
    reasons = [None] * checked.height
    bad = checked["code"].is_not_null()
    if bad.any():
        for i, r in zip(bad.arg_true().to_list(), checked.filter(bad).iter_rows(named=True)):
            reasons[i] = _reason(r, max_chars)
    return checked.select(
        pl.col("q").alias("question"), pl.col("a").alias("answer"), pl.col("ref").alias("reference_solution"),
        pl.lit(source).alias("source"), "level", "split", "metadata", "row", pl.Series("reason", reasons, dtype=pl.String),
    )


def _reason(r: dict, max_chars: int) -> str:
    code = r["code"]
    if code == "unparseable":
        return f"unparseable: {r['error']}"
    if code.startswith("bad_type_"):
        name = code.removeprefix("bad_type_")
        what = "text" if name == "question" else "text or a number"
        return f"bad_type: {name} is a {r[f'{name}_type']}, not {what}"
    if code == "empty_question":
        return "empty_question: the question is missing or blank"
    if code == "too_long":
        return f"too_long: the question has {len(r['question']):,} characters (problems.max_question_chars: {max_chars:,})"
    if code == "no_answer":
        return "no_answer: the answer is missing or blank"
    return f"bad_split: split {r['split']!r} is not 'train' or 'eval'"


def rejected_rows(source: str, rows: list[str], reasons: list[str]) -> pl.DataFrame:
    """`rejected` rows: each input row's JSON in its stored form, and why."""
    return pl.DataFrame({"source": [source] * len(rows), "row": [canonical_row(r) for r in rows], "reason": reasons},
                        schema={"source": pl.String, "row": pl.String, "reason": pl.String})


def splits(ids: list[str], seed: int, eval_fraction: float) -> list[str]:
    """``_split_of`` of every id, comparing digests' first 6 bytes with the threshold's (the same test, exactly:
    u = x / 2⁴⁸ < f  ⇔  x < ⌈f · 2⁴⁸⌉ for a 48-bit integer x)."""
    import math

    bound = math.ceil(eval_fraction * float(1 << 48))
    if bound >= 1 << 48:
        return ["eval"] * len(ids)
    b = bound.to_bytes(6, "big")
    sha = hashlib.sha256
    return ["eval" if sha(f"{seed}:{pid}".encode()).digest()[:6] < b else "train" for pid in ids]


# --------------------------------------------------------------------------- word n-grams


def tokens(keys: pl.Series) -> pl.DataFrame:
    """One row per word token of each question (``_TOKEN`` over its ``key_texts``): `row` (the question's position in
    ``keys``), `pos`, `tok`, and `L` the question's token count."""
    toks = keys.to_frame("t").select(pl.col("t").str.extract_all(r"\w+|[^\w\s]")).to_series()
    other = (~keys.str.contains(_PLAIN)).fill_null(False)
    if other.any():  # (a list column cannot be scattered into: through text joined by _SEP, which no token holds)
        joined = toks.list.join(_SEP)
        idx = other.arg_true()
        joined = joined.scatter(idx, pl.Series([_SEP.join(_TOKEN.findall(k)) for k in keys.gather(idx).to_list()], dtype=pl.String))
        toks = joined.to_frame("t").select(pl.when(pl.col("t") != "").then(pl.col("t").str.split(_SEP))
                                           .otherwise(pl.lit([], pl.List(pl.String)))).to_series()
    return (pl.DataFrame({"tok": toks}).with_row_index("row")
            .with_columns(L=pl.col("tok").list.len().cast(pl.UInt32))
            .with_columns(pos=pl.int_ranges(0, pl.col("L"), dtype=pl.UInt32))
            .explode(["tok", "pos"]).drop_nulls("tok"))


def windows(toks: pl.DataFrame, n: int) -> pl.DataFrame:
    """Each question's n-gram windows as 64-bit keys: `row`, `pos` (the window's first token), `h`; a question of
    fewer than n tokens is one gram of its own length (at pos 0). A window's key hashes its tokens' hashes, a shorter
    gram's its tokens joined by ``_SEP`` (grams of different lengths never meet): the same within a run, which is all
    the eval index needs (two grams share a key with odds ~ grams² / 2⁶⁴)."""
    window = pl.struct([pl.col("th").shift(-k).alias(f"t{k}") for k in range(n)]).hash(seed=0)
    full = (toks.lazy().filter(pl.col("L") >= n).with_columns(th=pl.col("tok").hash(seed=0)).with_columns(h=window)
            .filter(pl.col("pos") + n <= pl.col("L")))
    short = toks.lazy().filter(pl.col("L") < n).group_by("row", maintain_order=True).agg(_joined_key()).with_columns(pos=pl.lit(0, pl.UInt32))
    return pl.concat([full.select("row", "pos", "h"), short.select("row", "pos", "h")]).collect()


def _joined_key() -> pl.Expr:
    """(in a group's context) the key of a gram shorter than n: its tokens joined."""
    return pl.col("tok").str.join(_SEP).hash(seed=0).alias("h")


def template_grams(toks: pl.DataFrame, n: int, fraction: float, questions: int) -> pl.Series:
    """The keys of the windows found in more than ``fraction`` of the ``questions`` that ``toks`` covers."""
    counts = windows(toks, n).group_by("h").agg(pl.col("row").n_unique().alias("questions"))
    return counts.filter(pl.col("questions") > fraction * questions)["h"]


def informative(toks: pl.DataFrame, n: int, template: pl.Series | None) -> pl.DataFrame:
    """Each question's n-gram keys once its template text is cut out (`row`, `h`; a key may come twice: count them
    with ``n_unique``).

    Tokens covered by a template n-gram are removed; n-grams are then taken within each remaining run of tokens (a
    run shorter than n counts as one n-gram of its own length; runs under 3 tokens left over from a template, such as
    a lone "=", say nothing and are dropped). A question of fewer than n tokens that is itself template says nothing."""
    w = windows(toks, n)
    if template is None or template.is_empty():
        return w.select("row", "h")
    w = w.with_columns(in_t=pl.col("h").is_in(template.implode()))
    hit = w.filter("in_t")["row"].unique()
    if hit.is_empty():
        return w.select("row", "h")
    plain = w.filter(~pl.col("row").is_in(hit.implode()) & ~pl.col("in_t")).select("row", "h")  # nothing to cut out
    # the questions with template text, token by token: covered if a template window starting at most n-1 before covers it
    t = toks.filter(pl.col("row").is_in(hit.implode()) & (pl.col("L") >= n))
    t = t.join(w.filter("in_t").select("row", "pos", "in_t"), on=["row", "pos"], how="left", maintain_order="left")
    t = t.with_columns(covered=pl.col("in_t").fill_null(False).cast(pl.UInt8).rolling_max(window_size=n, min_samples=1).cast(pl.Boolean))
    # (no window of one question reaches the next: a question's last n-1 tokens start none)
    t = t.with_columns(run=(~pl.col("covered") & ((pl.col("pos") == 0) | pl.col("covered").shift(1))).cum_sum())
    free = t.filter(~pl.col("covered"))
    runs = free.group_by("run", maintain_order=True).agg(pl.col("row").first(), pl.len().alias("len"), _joined_key())
    short_runs = runs.filter((pl.col("len") >= min(n, 3)) & (pl.col("len") < n)).select("row", "h")
    long_runs = runs.filter(pl.col("len") >= n).select("run")
    starts = (free.join(long_runs, on="run", how="semi", maintain_order="left")
              .with_columns(end=pl.col("pos").shift(-(n - 1)).over("run"))
              .filter(pl.col("end").is_not_null()).select("row", "pos"))
    in_runs = w.join(starts, on=["row", "pos"], how="semi", maintain_order="left").select("row", "h")
    return pl.concat([plain, in_runs, short_runs])
