"""The `guidedrl run` flow: the stages of DESIGN.md in order, nothing else.

Stages that are not built yet are reported as such and skipped; a requested
stage brings its upstream stages along (finished ones cost nothing).
"""

from __future__ import annotations

from prefect import flow

from flows.stages import SHARDED, run_sharded_stage, stage_task
from tasks.config import IMPLEMENTED_STAGES, OPTIONAL_UPSTREAM, STAGES, UPSTREAM, parse_config
from tasks.runs import RunRecord


def upstream_closure(stages, with_optional=()) -> set[str]:
    """``stages`` and every stage they read, transitively: required upstream always,
    optional upstream (eval reads dpo, grpo) only when it is in ``with_optional``."""
    wanted, todo = set(), list(stages)
    while todo:
        s = todo.pop()
        if s in wanted:
            continue
        wanted.add(s)
        todo.extend(UPSTREAM[s])
        todo.extend(u for u in OPTIONAL_UPSTREAM.get(s, ()) if u in with_optional)
    return wanted


def select_stages(requested: list[str] | None, present=()) -> tuple[list[str], list[str]]:
    """(stages to run with all their upstream stages, requested stages still to come), in pipeline order.

    A stage brings along what it reads, transitively. An optional upstream stage
    (eval measures the dpo and grpo checkpoints) comes along when it is requested
    too or is in ``present``: it ran in the run being re-run, or its output for
    this config is in the store (``stored_optional``). Resolving a resolved list
    gives the same list."""
    requested = list(requested or STAGES)
    unknown = [s for s in requested if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are: {', '.join(STAGES)}")
    wanted = {s for s in requested if s in IMPLEMENTED_STAGES}
    wanted = upstream_closure(wanted, with_optional={*wanted, *present})
    run = [s for s in STAGES if s in wanted]
    todo = [s for s in STAGES if s in requested and s not in IMPLEMENTED_STAGES]
    return run, todo


def stored_optional(requested: list[str] | None, config, workspace: str) -> set[str]:
    """The optional upstream stages of ``requested`` whose output for this config is
    already in the store (with everything they read): they ran, so a stage that
    reads them when they ran (eval) reads them again."""
    from flows.stages import stored_outputs

    wanted = upstream_closure(requested or STAGES)
    present = set()
    for opt in sorted({u for s in wanted for u in OPTIONAL_UPSTREAM.get(s, ())} - wanted):
        chain = [s for s in STAGES if s in upstream_closure([opt])]
        if stored_outputs(config, workspace, chain)[1] is None:
            present.add(opt)
    return present


@flow(name="guidedrl-run")
def pipeline(raw_config: dict, base_dir: str, workspace: str, stages: list[str] | None = None, force: list[str] | None = None,
             run_record: str | None = None, record_prefix: str = "") -> dict:
    """The stages in order; with ``run_record`` (a run.json path) each stage's
    status, timing, output and error are written to that run record as they happen."""
    config = parse_config(raw_config, where="run config", base_dir=base_dir)
    to_run, _ = select_stages(stages)
    record = RunRecord.open(run_record) if run_record else None
    results: dict[str, dict] = {}
    for stage in to_run:
        upstream = {u: results[u]["path"] for u in UPSTREAM[stage]}
        upstream.update({u: results[u]["path"] for u in OPTIONAL_UPSTREAM.get(stage, ()) if u in results})
        forced = stage in (force or []) or not config.prefect.cache
        if record:
            record.stage_started(record_prefix + stage)
        try:
            if stage in SHARDED and config.prefect.fan_out:
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
