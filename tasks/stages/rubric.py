"""Stage `rubric` (ExpRL): each rolled-out problem's reference solution as
weighted checkpoint items, stored with the problem and reused by `grade`.

- `judge.backend: rule`: the items are the reference's checkable intermediate
  results (`a op b = c` lines), equally weighted; problems without any are
  listed in the summary and get no rubric.
- `judge.backend: openai` with `judge.rubric: true`: an LLM writes the items
  (`prompts.rubric`, lines `ITEM: weight | text`); its requests are cached on
  disk like every judge request, so a later round pays nothing for problems
  it has seen. With `judge.rubric: false` the dataset is empty (no requests).

Output: dataset `rubrics` (`problem_id`, `items` [{text, weight}], `rubric_model`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from tasks.core.schemas import to_table
from tasks.core.stage import Job, Stage
from tasks.core.store import StageOutput, Store
from tasks.models import judge

if TYPE_CHECKING:
    from tasks.registry import Config

#: its settings are the shared `judge` section (tasks/core/config.py: JudgeConfig)
STAGE = Stage(name="rubric", version="1", module=__name__, upstream=("curate", "rollouts"), writes={"rubrics": "rubrics"})

log = logging.getLogger("guidedrl.rubric")


def target_problems(upstream: dict[str, StageOutput]) -> list[dict]:
    """The problems the rollouts touched, by problem_id (a semi-join of the scanned datasets:
    one row per problem becomes a Python object, no trace does)."""
    touched = upstream["rollouts"].scan("rollouts").select("problem_id").unique()
    return upstream["curate"].scan("problems").join(touched, on="problem_id", how="semi").sort("problem_id").collect().to_arrow().to_pylist()


def preflight(config: Config) -> None:
    """Before any work: the judge has a model and an endpoint."""
    judge.check_judge(config)


def settings(config: Config) -> dict:
    return {"judge": config.judge.model_dump(mode="json", include={"backend", "rubric", "model", "temperature", "max_tokens"})}


def inputs(config: Config, upstream: dict[str, StageOutput]) -> dict:
    return {"problems": upstream["curate"].fingerprints["problems"], "rollouts": upstream["rollouts"].fingerprints["rollouts"],
            "prompt:rubric": judge.judge_prompts(config).fingerprint()}


def requests(config: Config, problems: list[dict]) -> list[tuple[str, str, int]]:
    prompts = judge.judge_prompts(config)
    return [("rubric", judge.fill_template(prompts.rubric, "rubric", question=p["question"], reference=judge.reference_text(p)), 0)
            for p in problems]


def compute(job: Job) -> StageOutput:
    config, store, upstream = job.config, job.store, job.upstream
    jc = config.judge
    problems = target_problems(upstream)
    rows, stats, without = [], {}, []
    if jc.backend == "rule":
        for p in problems:
            items = judge.rule_rubric(judge.reference_text(p))
            if items:
                rows.append({"problem_id": p["problem_id"], "items": items, "rubric_model": "rule"})
            else:
                without.append(p["problem_id"])
    elif jc.rubric:
        client = judge.open_client(config, store.workspace)
        parsed, raws, errors = judge.ask(client, requests(config, problems), lambda kind, text, n: judge.parse_rubric(text or ""))
        judge.check_failures(STAGE.name, [{"error": e} for e in errors], jc.max_failed_fraction, client)
        for p, items in zip(problems, parsed):
            if items:
                rows.append({"problem_id": p["problem_id"], "items": items, "rubric_model": f"openai:{client.model}"})
            else:
                without.append(p["problem_id"])
        stats = {k: client.stats[k] for k in ("requests", "cache_hits", "retries", "reminders", "failed")}
    summary = {
        "backend": jc.backend,
        "enabled": jc.backend == "rule" or jc.rubric,
        "problems": len(problems),
        "rubrics": len(rows),
        "items": sum(len(r["items"]) for r in rows),
        "problems_without_rubric": len(without),  # a count and the first few: summaries stay small at any scale
        "problems_without_rubric_first": without[:20],
        **({"judge_requests": stats} if stats else {}),
    }
    out = job.write({"rubrics": to_table(rows, "rubrics", "rubric/rubrics")}, summary, dataset_summaries={"rubrics": summary})
    log.info("rubric: %d of %d problems have a rubric (%d items, %s); %d without -> %s", len(rows), len(problems), summary["items"],
             "rule" if jc.backend == "rule" else ("llm" if jc.rubric else "off"), len(without), out.path)
    return out


def dry_run(config: Config, store: Store, upstream: dict[str, StageOutput]) -> dict:
    """What the rubric stage would send, counted before anything is sent (``--dry-run``)."""
    problems = target_problems(upstream)
    if config.judge.backend == "rule" or not config.judge.rubric:
        return {"stage": STAGE.name, "problems": len(problems), "requests": 0, "cached": 0,
                "note": "rule rubrics: no requests" if config.judge.backend == "rule" else "judge.rubric is off: no requests"}
    client = judge.open_client(config, store.workspace)
    return {"stage": STAGE.name, "problems": len(problems), **judge.request_plan(client, [text for _, text, _ in requests(config, problems)])}


def describe(s: dict) -> str:
    if not s.get("enabled"):
        return "off (judge.rubric: false)"
    return f"{s.get('rubrics')} of {s.get('problems')} problems have a rubric ({s.get('items')} items, {s.get('backend')})"
