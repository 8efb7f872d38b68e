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
from collections import Counter

from pydantic import Field, model_validator

from tasks.core.config import StrictModel
from tasks.core.schemas import to_table
from tasks.core.stage import Job, Stage
from tasks.core.store import StageOutput


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


def pass_rates(rollout_rows: list[dict]) -> dict[str, dict]:
    """problem_id -> {level, n, num_correct, pass_rate} over samples that generated."""
    out: dict[str, dict] = {}
    for r in rollout_rows:
        e = out.setdefault(r["problem_id"], {"level": r.get("level"), "n": 0, "num_correct": 0})
        if r["finish_reason"] == "error":
            continue
        e["n"] += 1
        e["num_correct"] += int(r["correct"])
    for e in out.values():
        e["pass_rate"] = e["num_correct"] / e["n"] if e["n"] else None
    return out


def filter_problems(problems: list[dict], rollout_rows: list[dict], min_rate: float, max_rate: float) -> tuple[list[dict], list[dict]]:
    rates = pass_rates(rollout_rows)
    kept, table = [], []
    by_id = {p["problem_id"]: p for p in problems}
    for pid, e in sorted(rates.items()):
        keep = e["pass_rate"] is not None and min_rate <= e["pass_rate"] <= max_rate
        table.append({"problem_id": pid, **e, "kept": keep})
        if keep:
            kept.append({**by_id[pid], "pass_rate": e["pass_rate"]})
    return kept, table


def settings(config) -> dict:
    return config.filter.model_dump(mode="json")


def inputs(config, upstream: dict[str, StageOutput]) -> dict:
    return {"problems": upstream["curate"].fingerprints["problems"], "rollouts": upstream["rollouts"].fingerprints["rollouts"]}


def compute(job: Job) -> StageOutput:
    fc, upstream = job.config.filter, job.upstream
    problems = upstream["curate"].read("problems").to_pylist()
    rows = upstream["rollouts"].read("rollouts").select(["problem_id", "level", "finish_reason", "correct"]).to_pylist()
    kept, table = filter_problems(problems, rows, fc.min_pass_rate, fc.max_pass_rate)
    summary = {
        "band": [fc.min_pass_rate, fc.max_pass_rate],
        "rolled_out": len(table),
        "kept": len(kept),
        "kept_by_level": dict(sorted(Counter(str(p["level"]) for p in kept).items())),
        "rolled_out_by_level": dict(sorted(Counter(str(t["level"]) for t in table).items())),
    }
    out = job.write({"problems": to_table(kept, "filtered_problems", "filter/problems"),
                     "pass_rates": to_table(table, "pass_rates", "filter/pass_rates")},
                    summary, dataset_summaries={"problems": summary, "pass_rates": summary})
    log.info("filter: kept %d of %d problems with pass rate in [%s, %s] %s -> %s", len(kept), len(table),
             fc.min_pass_rate, fc.max_pass_rate, summary["kept_by_level"], out.path)
    return out


def describe(s: dict) -> str:
    lo, hi = s.get("band", [None, None])
    return f"kept {s.get('kept')} of {s.get('rolled_out')} problems with pass rate in [{lo}, {hi}] {s.get('kept_by_level')}"
