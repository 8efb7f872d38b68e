"""Arrow schemas of every dataset guidedrl writes: the public Parquet contract.

One module for all stages, including those whose stages come later, so that a
column name means one thing everywhere (DESIGN.md, "Minimum columns").
Datasets may carry more columns than listed here; they may not lack one, nor
store one with another type. A field marked ``nullable=False`` must have no
nulls.

``validate_table`` is what every reader and writer calls; its errors name the
file (or dataset), the column and what was expected.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

SCHEMA_VERSION = 1

_str = pa.string()
_f32_list = pa.list_(pa.float32())
_i32_list = pa.list_(pa.int32())


def _f(name: str, type_: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable)


PROBLEMS = pa.schema(
    [
        _f("problem_id", _str),
        _f("question", _str),
        _f("answer", _str),
        _f("reference_solution", _str, nullable=True),
        _f("source", _str),
        _f("level", _str, nullable=True),
        _f("split", _str),  # 'train' | 'eval'
        _f("metadata", _str),  # JSON object as a string
    ]
)

REJECTED = pa.schema(
    [
        _f("source", _str),
        _f("row", _str),  # the input row as JSON
        _f("reason", _str),
    ]
)

ROLLOUTS = pa.schema(
    [
        _f("sample_id", _str),
        _f("problem_id", _str),
        _f("sample_idx", pa.int32()),
        _f("prompt", _str),
        _f("completion", _str),
        _f("completion_token_ids", _i32_list),
        _f("behaviour_logprobs", _f32_list, nullable=True),
        _f("temperature", pa.float64()),  # the sampling temperature behaviour_logprobs (and loss_logprobs) are at
        _f("finish_reason", _str),
        _f("extracted_answer", _str, nullable=True),
        _f("correct", pa.bool_()),
        _f("policy_id", _str),
        _f("prompt_kind", _str),  # 'plain' | 'explain' | 'hint' | 'prefix' | 'self_hint'
        _f("guidance", _str, nullable=True),
        _f("loss_prompt", _str),
        _f("loss_logprobs", _f32_list, nullable=True),
        _f("level", _str, nullable=True),
        _f("error", _str, nullable=True),  # set when generation failed (finish_reason 'error')
    ]
)

PASS_RATES = pa.schema(
    [
        _f("problem_id", _str),
        _f("level", _str, nullable=True),
        _f("n", pa.int32()),
        _f("num_correct", pa.int32()),
        _f("pass_rate", pa.float64(), nullable=True),  # null when every sample failed to generate
        _f("kept", pa.bool_()),
    ]
)

FILTERED_PROBLEMS = pa.schema(list(PROBLEMS) + [_f("pass_rate", pa.float64())])

EXPLANATIONS = pa.schema(
    list(ROLLOUTS)
    + [
        _f("explain_loglik", pa.float64(), nullable=True),  # per token, under the original prompt
        _f("explain_loglik_total", pa.float64(), nullable=True),
        _f("explain_answer_gain", pa.float64(), nullable=True),
        _f("leaks_answer", pa.bool_(), nullable=True),  # leans on having been shown the answer (explain.leak_check): never selected
        _f("selected", pa.bool_()),  # chosen for its problem by `explain.select`
    ]
)

GRADES = pa.schema(
    [
        _f("sample_id", _str),
        _f("outcome_score", pa.float64(), nullable=True),
        _f("step_scores", pa.list_(pa.float64()), nullable=True),
        _f("steps", pa.list_(_str)),
        _f("judge", _str),
        _f("judge_raw", _str, nullable=True),
        _f("parse_ok", pa.bool_()),
        _f("error", _str, nullable=True),
    ]
)

RUBRICS = pa.schema(
    [
        _f("problem_id", _str),
        _f(
            "items",
            pa.list_(pa.struct([pa.field("text", _str), pa.field("weight", pa.float64())])),
        ),
        _f("rubric_model", _str),
    ]
)

DPO = pa.schema(
    [
        _f("prompt", _str),
        _f("chosen", _str),
        _f("rejected", _str),
        _f("problem_id", _str),
        _f("chosen_kind", _str),
        _f("rejected_kind", _str),
    ]
)

GRPO = pa.schema(
    [
        _f("sample_id", _str),
        _f("group_id", _str),
        _f("loss_prompt", _str),
        _f("completion_token_ids", _i32_list),
        _f("reward", pa.float64(), nullable=True),
        _f("advantage", pa.float64(), nullable=True),
        _f("token_advantages", pa.list_(pa.float64()), nullable=True),
        _f("behaviour_logprobs", _f32_list, nullable=True),
        _f("loss_logprobs", _f32_list, nullable=True),
        _f("temperature", pa.float64()),  # the sampling temperature: the update scores tokens at it
        _f("is_guided", pa.bool_()),
        _f("prompt_kind", _str),
    ]
)

SFT = pa.schema(
    [
        _f("prompt", _str),
        _f("completion", _str),
        _f("problem_id", _str),
        _f("prompt_kind", _str),
        _f("sample_id", _str),
    ]
)

EVAL = pa.schema(
    [
        _f("policy_id", _str),
        _f("level", _str, nullable=True),
        _f("n", pa.int32()),
        _f("pass_at_1", pa.float64()),
        _f("pass_at_k", pa.float64()),
        _f("k", pa.int32()),
    ]
)

FRONTIER = pa.schema(
    [
        _f("run_id", _str),
        _f("round", pa.int32()),  # 1 for a `guidedrl run`; the round of `guidedrl online`
        _f("problem_id", _str),
        _f("level", _str, nullable=True),
        _f("n", pa.int32()),  # the round's rollouts of the problem that generated (errors do not count)
        _f("num_correct", pa.int32()),
        _f("pass_rate", pa.float64(), nullable=True),  # null when every sample failed to generate
        _f("stuck", pa.bool_()),  # n > 0 and num_correct == 0: in the stuck set this round
        _f("explain_verified", pa.int32(), nullable=True),  # right self-explanations (ExPO); null: explain did not run
        _f("hint_verified", pa.int32(), nullable=True),  # right hinted samples (LTE); null: hint did not run
        _f("prefix_verified", pa.int32(), nullable=True),  # right continuations of a reference prefix; null: prefix did not run
        _f("self_hint_verified", pa.int32(), nullable=True),  # right self-hinted samples; null: self_hint did not run
        _f("judge_partial", pa.int32(), nullable=True),  # wrong rollouts the judge gave some credit (ExpRL); null: grade did not run
        _f("left_stuck_round", pa.int32(), nullable=True),  # the first round it was solved again after being stuck
        _f("first_guided_round", pa.int32(), nullable=True),  # the first round in which, stuck, guidance produced a verified sample
        _f("first_guidance", _str, nullable=True),  # which: explain / hint / prefix / self_hint / judge (joined with '+' when several at once)
    ]
)

#: dataset kind -> schema; a dataset's manifest records its kind.
SCHEMAS: dict[str, pa.Schema] = {
    "problems": PROBLEMS,
    "rejected": REJECTED,
    "rollouts": ROLLOUTS,
    "pass_rates": PASS_RATES,
    "filtered_problems": FILTERED_PROBLEMS,
    "explanations": EXPLANATIONS,
    "grades": GRADES,
    "rubrics": RUBRICS,
    "dpo": DPO,
    "grpo": GRPO,
    "sft": SFT,
    "eval": EVAL,
    "frontier": FRONTIER,
}


class SchemaError(ValueError):
    """A dataset file lacks a contract column, has one with the wrong type, or
    has nulls where none are allowed. The message names the file and column."""


def validate_table(table: pa.Table, kind: str, where: str | Path) -> None:
    """Check ``table`` against the contract schema of ``kind``.

    ``where`` names the file or dataset in the error message.
    """
    if kind not in SCHEMAS:
        raise SchemaError(f"{where}: unknown dataset kind {kind!r}; known: {sorted(SCHEMAS)}")
    expected = SCHEMAS[kind]
    problems = []
    for field in expected:
        idx = table.schema.get_field_index(field.name)
        if idx < 0:
            problems.append(f"column {field.name!r} is missing (expected {field.type})")
            continue
        actual = table.schema.field(idx).type
        if not actual.equals(field.type) and not (
            pa.types.is_null(actual) and field.nullable
        ):
            problems.append(f"column {field.name!r} has type {actual}, expected {field.type}")
            continue
        if not field.nullable:
            nulls = table.column(idx).null_count
            if nulls:
                first = table.column(idx).is_null().to_pylist().index(True)
                problems.append(
                    f"column {field.name!r} has {nulls} null value(s) (first at row {first}), "
                    "but the contract does not allow nulls"
                )
    if problems:
        raise SchemaError(f"{where}: not a valid {kind!r} dataset: " + "; ".join(problems))


def to_table(rows: list[dict], kind: str, where: str = "<in memory>") -> pa.Table:
    """Build a contract table from row dicts: contract columns first, in contract
    order, with their contract types; extra keys are kept after them."""
    schema = SCHEMAS[kind]
    extra = []
    for row in rows[:1]:
        extra = [k for k in row if schema.get_field_index(k) < 0]
    columns = {}
    for field in schema:
        values = [r.get(field.name) for r in rows]
        try:
            columns[field.name] = pa.array(values, type=field.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise SchemaError(f"{where}: column {field.name!r} cannot be stored as {field.type}: {exc}") from exc
    for name in extra:
        columns[name] = pa.array([r.get(name) for r in rows])
    fields = list(schema) + [pa.field(n, columns[n].type) for n in extra]
    table = pa.Table.from_arrays(list(columns.values()), schema=pa.schema(fields))
    validate_table(table, kind, where)
    return table


def conform(table: pa.Table, kind: str, where: str = "<in memory>") -> pa.Table:
    """An Arrow table (from polars or a scanner) as a contract table: contract columns first,
    in contract order, cast to their contract types; extra columns kept after them."""
    schema = SCHEMAS[kind]
    columns, fields = [], []
    for field in schema:
        if field.name not in table.column_names:
            raise SchemaError(f"{where}: column {field.name!r} is missing (expected {field.type})")
        try:
            columns.append(table.column(field.name).cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
            raise SchemaError(f"{where}: column {field.name!r} cannot be stored as {field.type}: {exc}") from exc
        fields.append(field)
    for name in table.column_names:
        if schema.get_field_index(name) < 0:
            columns.append(table.column(name))
            fields.append(pa.field(name, table.schema.field(name).type))
    out = pa.Table.from_arrays(columns, schema=pa.schema(fields))
    validate_table(out, kind, where)
    return out


# --------------------------------------------------------------------------- grpo rows by kind


def _grpo_kinds(needs_behaviour: bool = True):
    """(explanation row, usable sample row) as polars expressions over a grpo dataset's columns: the rows
    the update trains on are either (tasks/stages/_grpo_data.py ``row_kind``); the rest are masked. A sample
    row needs behaviour log-probs when the update's π_old is the sampler's (``needs_behaviour``), and always
    when it is guided."""
    import polars as pl

    explain = pl.col("prompt_kind") == "explain"
    behaviour = pl.col("behaviour_logprobs").is_not_null()
    usable = (pl.col("advantage").is_not_null() & (behaviour if needs_behaviour else behaviour | ~pl.col("is_guided"))
              & (pl.col("completion_token_ids").list.len() > 0))
    return explain, usable


def trainable(lf, needs_behaviour: bool = True):
    """A grpo LazyFrame's rows the update trains on (``row_kind`` not masked), as a polars filter."""
    explain, usable = _grpo_kinds(needs_behaviour)
    return lf.filter(explain | usable)


def kind_counts(lf, needs_behaviour: bool = True) -> dict[str, int]:
    """``rows_by_kind`` of a grpo LazyFrame, counted in one streaming query."""
    import polars as pl

    explain, usable = _grpo_kinds(needs_behaviour)
    masked = ~explain & ~usable
    counts = lf.select(explain.sum().alias("explain"), masked.sum().alias("masked"),
                       (~explain & ~masked & pl.col("is_guided")).sum().alias("guided"),
                       (~explain & ~masked & ~pl.col("is_guided")).sum().alias("plain")).collect(engine="streaming").row(0, named=True)
    return {k: int(counts[k] or 0) for k in ("plain", "guided", "explain", "masked")}
