"""The `guidedrl run` flow: the requested stages in pipeline order, nothing else.

The stages, their order and what each reads come from the registry
(tasks/registry.py); a requested stage brings what it reads along (finished
ones cost nothing).
"""

from __future__ import annotations

from prefect import flow

from flows.stages import run_sharded_stage, stage_task
from tasks.registry import REGISTRY, parse_config, select_stages, upstream_of
from tasks.report.runs import RunRecord


@flow(name="guidedrl-run")
def pipeline(raw_config: dict, base_dir: str, workspace: str, stages: list[str] | None = None, force: list[str] | None = None,
             run_record: str | None = None, record_prefix: str = "") -> dict:
    """The stages in order; with ``run_record`` (a run.json path) each stage's
    status, timing, output and error are written to that run record as they happen."""
    config = parse_config(raw_config, where="run config", base_dir=base_dir)
    record = RunRecord.open(run_record) if run_record else None
    results: dict[str, dict] = {}
    selected = select_stages(stages, config=config)
    for stage in selected:
        upstream = upstream_of(stage, {s: r["path"] for s, r in results.items()}, config, run=selected)
        forced = stage in (force or []) or not config.prefect.cache
        if record:
            record.stage_started(record_prefix + stage)
        try:
            if REGISTRY[stage].sharded and config.prefect.fan_out:
                result = run_sharded_stage(stage, config, raw_config, base_dir, workspace, upstream, forced)
                result["status"] = "reused" if result["reused"] else "computed"
            else:
                state = stage_task(stage, config, workspace, upstream, forced)(
                    stage, raw_config, base_dir, workspace, upstream, force=forced, return_state=True
                )
                result = state.result()  # raises the stage's error once its retries are spent
                result["status"] = "cached" if state.name == "Cached" else "reused" if result["reused"] else "computed"
        except BaseException as exc:
            if record:
                record.stage_failed(record_prefix + stage, exc)
            raise
        results[stage] = result
        if record:
            record.stage_finished(record_prefix + stage, result)
    return results
