"""Stage `filter`: curation by the model — keep the problems whose pass rate
under the current policy lies in a band (by default exactly 0: the stuck ones).

Inputs: the curated `problems` and the `rollouts` of the current policy.
Method: pass rate = correct samples / samples that generated (rows whose
generation failed do not count either way); keep `min_pass_rate <= rate <=
max_pass_rate`. A problem with no usable sample has no rate and is not kept.
Outputs: `problems` (the kept problems, with `pass_rate`) and `pass_rates`
(every rolled-out problem: n, num_correct, pass_rate, kept).
"""

from __future__ import annotations

import logging
from collections import Counter

from tasks.config import Config
from tasks.schemas import to_table
from tasks.store import Store, StageOutput, stage_key

STAGE = "filter"
STAGE_VERSION = "1"

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


def key_for(config: Config, upstream: dict[str, StageOutput]) -> tuple[str, dict, dict]:
    stage_cfg = config.stage_config(STAGE)
    inputs = {"problems": upstream["curate"].fingerprints["problems"], "rollouts": upstream["rollouts"].fingerprints["rollouts"]}
    return stage_key(STAGE, stage_cfg, inputs, STAGE_VERSION), stage_cfg, inputs


def run(config: Config, store: Store, upstream: dict[str, StageOutput], force: bool = False) -> tuple[StageOutput, bool]:
    key, stage_cfg, inputs = key_for(config, upstream)
    existing = store.reusable(STAGE, key, force)
    if existing is not None:
        return existing, True
    fc = config.filter
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
    out = store.write(STAGE, key, {"problems": ("filtered_problems", to_table(kept, "filtered_problems", "filter/problems")),
                                   "pass_rates": ("pass_rates", to_table(table, "pass_rates", "filter/pass_rates"))},
                      config=stage_cfg, inputs=inputs, stage_version=STAGE_VERSION, summary=summary, replace=force,
                      dataset_summaries={"problems": summary, "pass_rates": summary})
    log.info("filter: kept %d of %d problems with pass rate in [%s, %s] %s -> %s", len(kept), len(table),
             fc.min_pass_rate, fc.max_pass_rate, summary["kept_by_level"], out.path)
    return out, False
