"""How the stage `materialize` reads and writes its rows in Arrow: the input columns it reads of each chunk of whole
problems, the per-token lists passed from the inputs to the grpo rows by position (never as Python lists), and the
sources of a chunked read. Not a stage (its name starts with an underscore)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.core.groups import Source, read_chunk
from tasks.core.schemas import conform
from tasks.core.store import StageOutput, data_files


#: per-token columns: passed from the inputs to the grpo rows in Arrow, never as Python lists
TOKEN_LISTS = ("completion_token_ids", "behaviour_logprobs", "loss_logprobs")
#: the grpo columns that come from the input rows as they are: taken from Arrow by position (``grpo_table``)
TAKEN = TOKEN_LISTS + ("sample_id", "loss_prompt", "temperature", "prompt_kind", "problem_id", "completion", "correct")


def read_without_token_lists(path, source: str, keep_ids: bool) -> tuple[list[dict], pa.Table]:
    """A chunk file's rows as dicts without the per-token lists (each row knows where it is:
    ``_at`` = (source, row)), and the ``TAKEN`` columns as an Arrow table. ``keep_ids``: the rows keep
    ``completion_token_ids`` (token advantages need them)."""
    table = read_chunk(path)
    cols = [c for c in table.column_names if c not in TOKEN_LISTS or (keep_ids and c == "completion_token_ids")]
    rows = table.select(cols).to_pylist()
    for i, r in enumerate(rows):
        r["_at"] = (source, i)
    return rows, table.select(list(TAKEN))


def grpo_table(rows: list[dict], taken_from: dict[str, pa.Table]) -> pa.Table:
    """The grpo rows as a contract table: what build decided (group, reward, advantages, guided)
    from the rows, the rest taken from the inputs' Arrow tables by position; an unguided row
    without loss-side log-probs uses its behaviour ones (as ``_grpo_row`` does for in-memory rows)."""
    offsets, at = {}, 0
    for name, t in taken_from.items():
        offsets[name], at = at, at + t.num_rows
    index = [offsets[source] + i for source, i in (r["_at"] for r in rows)]
    taken = pa.concat_tables(list(taken_from.values()), promote_options="permissive").take(index)
    guided = pa.array([r["is_guided"] for r in rows], pa.bool_())
    decided = {"group_id": pa.array([r["group_id"] for r in rows], pa.string()),
               "reward": pa.array([r["reward"] for r in rows], pa.float64()),
               "advantage": pa.array([r["advantage"] for r in rows], pa.float64()),
               "token_advantages": pa.array([r["token_advantages"] for r in rows], pa.list_(pa.float64())), "is_guided": guided}
    loss = taken.column("loss_logprobs")
    missing = pc.fill_null(pc.or_(pc.is_null(loss), pc.equal(pc.list_value_length(loss), 0)), True)
    use_behaviour = pc.and_(pc.invert(guided), missing)
    light = taken.drop_columns(list(TOKEN_LISTS) + ["correct"])
    light = light.append_column("correct", pc.fill_null(taken.column("correct"), False))
    for name, values in decided.items():
        light = light.append_column(name, values)
    columns = {"completion_token_ids": taken.column("completion_token_ids"), "behaviour_logprobs": taken.column("behaviour_logprobs"),
               "loss_logprobs": pc.if_else(use_behaviour, taken.column("behaviour_logprobs"), loss)}
    for name, values in columns.items():
        light = light.append_column(name, values)
    return conform(light, "grpo", "materialize/grpo")


#: the columns of rollouts, explanations and hints that ``build`` reads (besides ``TOKEN_LISTS``)
ROW_COLUMNS = ("sample_id", "problem_id", "sample_idx", "correct", "finish_reason", "loss_prompt", "completion", "temperature",
               "prompt_kind", "selected")


def chunk_sources(upstream: dict[str, StageOutput], with_grades: bool, guidance: dict[str, str]) -> tuple[Source, dict[str, Source]]:
    """What ``build`` reads, as sources of a chunked read: the rollouts, and the explanations,
    hints and (``with_grades``: the rewards are the judge's) grades of the same problems (only the columns it uses)."""
    def source(output: StageOutput, name: str) -> Source:
        names = pq.read_schema(data_files(output.dataset_path(name))[0]).names
        return Source(output, name, [c for c in names if c in ROW_COLUMNS or c in TOKEN_LISTS])

    grade_cols = ["sample_id", "outcome_score", "step_scores", "steps", "parse_ok"]
    others = {name: source(upstream[stage], name) for stage, name in guidance.items()
              if stage in upstream}
    if with_grades:
        others["grades"] = Source(upstream["grade"], "grades", grade_cols, join_on="sample_id")
    return source(upstream["rollouts"], "rollouts"), others
