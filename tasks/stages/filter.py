"""Stage `filter`: curation by the model — keep the problems whose pass rate
under the current policy lies in a band (by default exactly 0: the stuck ones).

Inputs: the curated `problems` and the `rollouts` of the current policy.
Method: pass rate = correct samples / samples that generated (rows whose
generation failed do not count either way); keep `min_pass_rate <= rate <=
max_pass_rate`. A problem with no usable sample has no rate and is not kept.
Outputs: `problems` (the kept problems, with `pass_rate`) and `pass_rates`
(every rolled-out problem: n, num_correct, pass_rate, kept). The guidance
stages (`explain`, `hint`) work on the kept problems: the band decides what
they work on ("stuck" is decided here, once).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import pyarrow as pa
from pydantic import Field, model_validator

from tasks.core.config import StrictModel
from tasks.core.schemas import conform
from tasks.core.stage import Job, Stage
from tasks.core.store import StageOutput

if TYPE_CHECKING:
    import polars as pl


class FilterConfig(StrictModel):
    """Keep problems whose pass rate under the current policy lies in [min, max]."""

    min_pass_rate: float = Field(0.0, ge=0, le=1)
    max_pass_rate: float = Field(0.0, ge=0, le=1, description="0.0 with min 0.0 keeps exactly the stuck problems")

    @model_validator(mode="after")
    def _band(self):
        if self.min_pass_rate > self.max_pass_rate:
            raise ValueError("min_pass_rate must be at most max_pass_rate")
        return self


STAGE = Stage(name="filter", version="1", module=__name__, upstream=("curate", "rollouts"),
              writes={"problems": "filtered_problems", "pass_rates": "pass_rates"}, section="filter", settings_model=FilterConfig)

log = logging.getLogger("guidedrl.filter")


def filter_problems(problems: "pl.LazyFrame", rollouts: "pl.LazyFrame", min_rate: float, max_rate: float) -> tuple[pa.Table, pa.Table]:
    """(the kept problems with their ``pass_rate``, every rolled-out problem's n / num_correct /
    pass_rate / kept), both sorted by problem_id. One lazy polars query: the rollouts are
    scanned, never held; what is collected is one row per problem."""
    import polars as pl

    generated = pl.col("finish_reason") != "error"
    rates = (rollouts.select("problem_id", "level", "finish_reason", "correct")
             .group_by("problem_id", maintain_order=True)
             .agg(pl.col("level").first(), generated.sum().cast(pl.Int32).alias("n"),
                  (pl.col("correct") & generated).sum().cast(pl.Int32).alias("num_correct"))
             .with_columns(pl.when(pl.col("n") > 0).then(pl.col("num_correct") / pl.col("n")).otherwise(None).alias("pass_rate"))
             .with_columns(pl.col("pass_rate").is_between(min_rate, max_rate).fill_null(False).alias("kept"))
             .sort("problem_id"))
    table = rates.collect(engine="streaming")
    kept = (problems.join(table.lazy().filter("kept").select("problem_id", "pass_rate"), on="problem_id", how="inner")
            .sort("problem_id").collect(engine="streaming"))
    return kept.to_arrow(), table.to_arrow()


def settings(config) -> dict:
    return config.filter.model_dump(mode="json")


def inputs(config, upstream: dict[str, StageOutput]) -> dict:
    return {"problems": upstream["curate"].fingerprints["problems"], "rollouts": upstream["rollouts"].fingerprints["rollouts"]}


def _by_level(table: pa.Table) -> dict[str, int]:
    import polars as pl

    counts = pl.from_arrow(table.select(["level"])).group_by("level").len().rows()
    return dict(sorted((str(level), n) for level, n in counts))


def compute(job: Job) -> StageOutput:
    fc, upstream = job.config.filter, job.upstream
    kept, table = filter_problems(upstream["curate"].scan("problems"), upstream["rollouts"].scan("rollouts"),
                                  fc.min_pass_rate, fc.max_pass_rate)
    summary = {
        "band": [fc.min_pass_rate, fc.max_pass_rate],
        "rolled_out": table.num_rows,
        "kept": kept.num_rows,
        "kept_by_level": _by_level(kept),
        "rolled_out_by_level": _by_level(table),
    }
    out = job.write({"problems": conform(kept, "filtered_problems", "filter/problems"),
                     "pass_rates": conform(table, "pass_rates", "filter/pass_rates")},
                    summary, dataset_summaries={"problems": summary, "pass_rates": summary})
    log.info("filter: kept %d of %d problems with pass rate in [%s, %s] %s -> %s", kept.num_rows, table.num_rows,
             fc.min_pass_rate, fc.max_pass_rate, summary["kept_by_level"], out.path)
    return out


def describe(s: dict) -> str:
    lo, hi = s.get("band", [None, None])
    return f"kept {s.get('kept')} of {s.get('rolled_out')} problems with pass rate in [{lo}, {hi}] {s.get('kept_by_level')}"
