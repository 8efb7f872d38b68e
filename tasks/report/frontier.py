"""The frontier: which problems are stuck, round by round, and what got them out.

For every round of a run (one round for `guidedrl run`, each round of `guidedrl
online`) and every problem the round rolled out, a `frontier` row: the round's
pass rate, whether the problem was in the stuck set (rolled out, never right),
how many verified samples each guidance produced for it that round (right
self-explanations — ExPO; right hinted samples — LTE; right continuations of a
reference prefix; right self-hinted samples; wrong rollouts the judge gave
partial credit — ExpRL), and per problem the round it left the stuck set
and the guidance that first produced a verified sample for it while it was
stuck. Across nightly runs of the same problem set, `combine` orders the runs
and derives the same per-problem columns over all their rounds.

Everything is a polars query over the round outputs' Parquet files (a few
columns of each; nothing held as Python rows). The table is written into the
store as a `frontier` dataset (stage name ``frontier``, keyed by the round
outputs it was made of), so other teams read it like any other dataset.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pyarrow as pa

from tasks.core.schemas import conform
from tasks.core.store import StageOutput, Store, stage_key

log = logging.getLogger("guidedrl.frontier")

STAGE = "frontier"
VERSION = "2"
GUIDANCE = ("explain", "hint", "prefix", "self_hint", "judge")
#: the count column of each guidance
VERIFIED = {"explain": "explain_verified", "hint": "hint_verified", "prefix": "prefix_verified", "self_hint": "self_hint_verified",
            "judge": "judge_partial"}
#: the round stages the frontier reads
READS = ("rollouts", "explain", "hint", "prefix", "self_hint", "grade")
_ROUND = re.compile(r"^round-(\d+)/(.+)$")


def round_outputs(stages: dict[str, dict]) -> dict[int, dict[str, Path]]:
    """round -> stage -> output path, from a run record's stage entries (``round-k/<stage>`` for
    online rounds, a plain stage name for round 1 of `guidedrl run`); finished stages only."""
    rounds: dict[int, dict[str, Path]] = {}
    for name, s in stages.items():
        if not s.get("path") or s.get("status") not in ("computed", "reused", "cached"):
            continue
        m = _ROUND.match(name)
        r, stage = (int(m.group(1)), m.group(2)) if m else (1, name)
        rounds.setdefault(r, {})[stage] = Path(s["path"])
    return {r: v for r, v in sorted(rounds.items()) if "rollouts" in v}


def _round_frame(run_id: str, round_idx: int, paths: dict[str, Path]):
    """The frontier rows of one round (without the per-problem columns), lazily."""
    import polars as pl

    rollouts = StageOutput.open(paths["rollouts"]).scan("rollouts").select("sample_id", "problem_id", "level", "correct", "finish_reason")
    ok = pl.col("finish_reason") != "error"
    lf = (rollouts.group_by("problem_id")
          .agg(pl.col("level").first(), ok.sum().cast(pl.Int32).alias("n"), (pl.col("correct") & ok).sum().cast(pl.Int32).alias("num_correct")))
    lf = lf.with_columns(pass_rate=pl.when(pl.col("n") > 0).then(pl.col("num_correct") / pl.col("n")),
                         stuck=(pl.col("n") > 0) & (pl.col("num_correct") == 0))

    def counts(stage: str, dataset: str, column: str, frame=None):
        nonlocal lf
        if stage not in paths:
            lf = lf.with_columns(pl.lit(None, dtype=pl.Int32).alias(column))
            return
        frame = frame if frame is not None else StageOutput.open(paths[stage]).scan(dataset).filter(pl.col("correct"))
        per = frame.group_by("problem_id").agg(pl.len().cast(pl.Int32).alias(column))
        lf = lf.join(per, on="problem_id", how="left").with_columns(pl.col(column).fill_null(0))

    if "explain" in paths:  # a right explanation that leans on the shown answer is not verified (never selected either)
        counts("explain", "explanations", "explain_verified", StageOutput.open(paths["explain"]).scan("explanations").filter(
            pl.col("correct") & ~pl.col("leaks_answer").fill_null(False)))
    else:
        counts("explain", "explanations", "explain_verified")
    counts("hint", "hints", "hint_verified")
    counts("prefix", "prefixed", "prefix_verified")
    counts("self_hint", "self_hints", "self_hint_verified")
    if "grade" in paths:
        grades = StageOutput.open(paths["grade"]).scan("grades").select("sample_id", "outcome_score", "step_scores")
        credit = (pl.col("outcome_score").fill_null(0) > 0) | (pl.col("step_scores").list.max().fill_null(0) > 0)
        partial = rollouts.filter(~pl.col("correct") & ok).join(grades, on="sample_id").filter(credit)
        counts("grade", "grades", "judge_partial", partial)
    else:
        counts("grade", "grades", "judge_partial")
    return lf.with_columns(run_id=pl.lit(run_id), round=pl.lit(round_idx, dtype=pl.Int32))


def derive(lf, step: str = "round"):
    """Add the per-problem columns over the rows' order ``step`` (a round, or a run's place among
    nights then its round): the step it left the stuck set (solved again after a stuck step), the
    step in which, stuck, a guidance first produced a verified sample, and which guidance that was."""
    import polars as pl

    by = "problem_id"
    guided = [(pl.col(VERIFIED[g]).fill_null(0) > 0) & pl.col("stuck") for g in GUIDANCE]
    any_guided = pl.any_horizontal(guided)
    label = pl.concat_str([pl.when(c).then(pl.lit(g)) for g, c in zip(GUIDANCE, guided)], separator="+", ignore_nulls=True)
    lf = lf.with_columns(_first_stuck=pl.col(step).filter(pl.col("stuck")).min().over(by),
                         _label=pl.when(any_guided).then(label))
    lf = lf.with_columns(
        _left=pl.col(step).filter(~pl.col("stuck") & (pl.col("n") > 0) & (pl.col(step) > pl.col("_first_stuck"))).min().over(by),
        _guided=pl.col(step).filter(any_guided).min().over(by))
    return lf.with_columns(first_guidance=pl.col("_label").filter(pl.col(step) == pl.col("_guided")).first().over(by)).drop(
        "_first_stuck", "_label")


def frontier_table(run_id: str, rounds: dict[int, dict[str, Path]]) -> pa.Table:
    """The `frontier` table of one run from its round outputs (`round_outputs`)."""
    import polars as pl

    if not rounds:
        raise ValueError(f"run {run_id}: no finished rollouts in any round, so there is no frontier to build")
    lf = pl.concat([_round_frame(run_id, r, paths) for r, paths in rounds.items()], how="vertical_relaxed")
    lf = derive(lf).rename({"_left": "left_stuck_round", "_guided": "first_guided_round"}).sort("round", "problem_id")
    return conform(lf.collect().to_arrow(), "frontier", f"frontier of run {run_id}")


def by_round(table: pa.Table) -> list[dict]:
    """Per round (per night and round for `combine`d runs): problems rolled out, samples and right
    ones, the stuck-set size, how many stuck problems each guidance reached with a verified sample
    (None where that guidance did not run), and how many problems left the stuck set then."""
    import polars as pl

    df = pl.from_arrow(table)
    keys = ["night", "round"] if "night" in df.columns else ["round"]
    when = pl.col("left_stuck_round") == pl.col("round")
    if "night" in keys:
        when = when & (pl.col("left_stuck_night") == pl.col("night"))
    left = df.filter(when).group_by(keys).agg(pl.col("problem_id").n_unique().alias("left_stuck"))
    stats = df.group_by(keys).agg(
        pl.len().alias("problems"), pl.col("stuck").sum().alias("stuck"), pl.col("num_correct").sum().alias("correct"),
        pl.col("n").sum().alias("samples"),
        *[((pl.col(VERIFIED[g]) > 0) & pl.col("stuck")).sum().alias(g) for g in GUIDANCE],
        *[pl.col(VERIFIED[g]).is_null().all().alias(f"_{g}_absent") for g in GUIDANCE])
    rows = stats.join(left, on=keys, how="left").with_columns(pl.col("left_stuck").fill_null(0)).sort(keys).to_dicts()
    for r in rows:
        for g in GUIDANCE:
            if r.pop(f"_{g}_absent"):
                r[g] = None
    return rows


def summarize(table: pa.Table) -> dict:
    """The frontier's summary: problems, rounds, the stuck set at the first and last round,
    how many problems left it, and `by_round`."""
    import polars as pl

    df = pl.from_arrow(table)
    rows = by_round(table)
    return {"rounds": len(rows), "problems": df["problem_id"].n_unique(), "stuck_first": rows[0]["stuck"] if rows else 0,
            "stuck_last": rows[-1]["stuck"] if rows else 0,
            "left_stuck": df.filter(pl.col("left_stuck_round").is_not_null())["problem_id"].n_unique(), "by_round": rows}


def build_frontier(store: Store, run_id: str, rounds: dict[int, dict[str, Path]]) -> tuple[StageOutput, bool]:
    """Write (or find) the run's `frontier` output in the store; returns it and whether it was reused."""
    inputs = {f"round-{r}/{stage}": StageOutput.open(p).manifest.get("stage_key", p.name)
              for r, paths in rounds.items() for stage, p in sorted(paths.items()) if stage in READS}
    config = {"run_id": run_id}
    key = stage_key(STAGE, config, inputs, VERSION)
    with store.lock(STAGE, key):
        found = store.get(STAGE, key)
        if found:
            return found, True
        table = frontier_table(run_id, rounds)
        summary = summarize(table)
        out = store.write(STAGE, key, {"frontier": ("frontier", table)}, config=config, inputs=inputs, stage_version=VERSION,
                          summary=summary, dataset_summaries={"frontier": {k: v for k, v in summary.items() if k != "by_round"}})
    log.info("frontier of run %s: %d problems over %d round(s), stuck %d -> %d, %d left the stuck set -> %s", run_id,
             summary["problems"], summary["rounds"], summary["stuck_first"], summary["stuck_last"], summary["left_stuck"], out.path)
    return out, False


def record_frontier(record) -> StageOutput:
    """Build the frontier of a run record's rounds and note it in the record (stage ``frontier``),
    so that the run's report charts it and `gc` keeps it."""
    import time

    t0 = time.time()
    out, reused = build_frontier(Store(record.data["workspace"]), record.run_id, round_outputs(record.data["stages"]))
    if record.data["stages"].get(STAGE, {}).get("path") != str(out.path):
        record.data["stages"][STAGE] = {"status": "reused" if reused else "computed", "seconds": round(time.time() - t0, 2),
                                        "key": out.key, "path": str(out.path), "summary": out.summary}
        record.save()
    return out


def combine(tables: list[pa.Table]) -> pa.Table:
    """Several runs' frontiers (nightly runs of one problem set, in the order given) as one:
    ``night`` (1-based) is the run's place, and the per-problem columns are derived over all
    (night, round) steps — ``left_stuck_night`` / ``first_guided_night`` say in which run."""
    import polars as pl

    lf = pl.concat([pl.from_arrow(t).lazy().drop("left_stuck_round", "first_guided_round", "first_guidance")
                    .with_columns(night=pl.lit(i + 1, dtype=pl.Int32)) for i, t in enumerate(tables)], how="vertical_relaxed")
    lf = lf.with_columns(_step=pl.col("night") * 1_000_000 + pl.col("round"))
    lf = derive(lf, "_step").with_columns(
        left_stuck_night=(pl.col("_left") // 1_000_000).cast(pl.Int32), left_stuck_round=(pl.col("_left") % 1_000_000).cast(pl.Int32),
        first_guided_night=(pl.col("_guided") // 1_000_000).cast(pl.Int32), first_guided_round=(pl.col("_guided") % 1_000_000).cast(pl.Int32))
    return lf.drop("_left", "_guided", "_step").sort("night", "round", "problem_id").collect().to_arrow()
