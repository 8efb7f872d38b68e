"""Each stage as a Prefect task: retries and caching declared here, logic in tasks/stages.

Which stages exist, what they read and whether they are sharded comes from the
registry (tasks/registry.py). Cache keys come from the dataset store: a stage's
key is the hash of (stage, the stage's settings, input fingerprints, its version),
combined with the source of the task and of the stage module. DataFrames are
never hashed: tasks receive the raw config and the paths of their upstream
outputs only.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

from prefect import task
from prefect.cache_policies import NO_CACHE, CachePolicy, TaskSource
from prefect.futures import wait

from flows.errors import quiet_library_warnings, quiet_user_errors, retry_unless_bad_input
from tasks.core import interrupt
from tasks.core.shards import ShardPlan
from tasks.core.store import StageOutput, Store
from tasks.registry import REGISTRY, Config, parse_config

log = logging.getLogger("guidedrl.stages")
quiet_user_errors()  # a user's error in a stage is one line in the log, not an engine traceback
quiet_library_warnings()  # ... and no library's FutureWarning reaches it (flows run in Prefect workers too)


def _config(raw_config: dict, base_dir: str) -> Config:
    return parse_config(raw_config, where="run config", base_dir=Path(base_dir))


def load_upstream(upstream: dict[str, str]) -> dict[str, StageOutput]:
    """Upstream stage outputs from their store paths."""
    return {stage: StageOutput.open(path) for stage, path in upstream.items()}


def _module_source_hash(module: ModuleType) -> str:
    return hashlib.sha256(inspect.getsource(module).encode()).hexdigest()


def _result(stage: str, out: StageOutput, reused: bool, **extra: Any) -> dict:
    """What a stage task hands the flow (and the run record): where its output is and its summary."""
    return {"stage": stage, "key": out.key, "path": str(out.path), "reused": reused,
            "datasets": out.manifest.get("datasets", {}), "summary": out.summary, **extra}


@dataclass
class StoreCache(CachePolicy):
    """Prefect cache key = the stage's store key + the task's and stage module's source."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters, **kwargs: Any) -> Optional[str]:
        if not task_ctx:
            return None
        stage = REGISTRY[inputs["stage"]]
        config = _config(inputs["raw_config"], inputs["base_dir"])
        key = stage.key_for(config, load_upstream(inputs.get("upstream") or {}))[0]
        source = TaskSource().compute_key(task_ctx, inputs, flow_parameters, **kwargs)
        return hashlib.sha256(f"{stage.name}:{key}:{source}:{_module_source_hash(stage.impl)}".encode()).hexdigest()


@task(name="stage", cache_policy=StoreCache(), persist_result=True)
def run_stage(stage: str, raw_config: dict, base_dir: str, workspace: str, upstream: dict[str, str], force: bool = False) -> dict:
    """Run one stage (or return its stored output) and describe the result."""
    out, reused = REGISTRY[stage].run(_config(raw_config, base_dir), Store(workspace), load_upstream(upstream), force=force)
    return _result(stage, out, reused)


def stage_task(stage: str, config: Config, workspace: str, upstream: dict[str, str], force: bool = False):
    """The Prefect task of ``stage`` with this config's retry and cache policy.

    Prefect's cached result is refreshed (not used) when the stage's output is
    not in the store — deleted, or another workspace — so a cache hit never
    hands back a path that does not exist; ``force`` recomputes the stage.
    """
    key = REGISTRY[stage].key_for(config, load_upstream(upstream))[0]
    in_store = Store(workspace).get(stage, key) is not None
    return run_stage.with_options(
        name=stage,
        task_run_name=stage,
        retries=config.prefect.retries_for(stage),
        retry_delay_seconds=config.prefect.retry_delay_seconds,
        retry_condition_fn=retry_unless_bad_input,
        cache_policy=StoreCache() if config.prefect.cache else NO_CACHE,
        refresh_cache=force or not in_store,
    )


# --------------------------------------------------------------------------- shards as tasks


@task(name="shard", cache_policy=NO_CACHE)
def run_shard(stage: str, raw_config: dict, base_dir: str, shard_plan: ShardPlan, index: int) -> dict:
    """Do one shard of a sharded stage into the stage's work directory (a finished
    shard is skipped). ``shard_plan`` holds this shard's items only
    (``ShardPlan.for_shard``): the task reads nothing else from the store."""
    import os
    import socket

    module = REGISTRY[stage].impl
    meta = {} if shard_plan.finished(index) else module.run_shard(_config(raw_config, base_dir), shard_plan, index)
    return {**meta, "worker": f"{socket.gethostname()}:{os.getpid()}", "node": _ray_node()}


def _ray_node() -> str | None:
    """The Ray node this task runs on (None outside Ray)."""
    import sys

    if "ray" not in sys.modules:
        return None
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def task_runner_for(config: Config):
    """The task runner of shard tasks: threads (default) or Ray through prefect-ray."""
    pc = config.prefect
    if pc.task_runner == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise ValueError("prefect.task_runner: ray needs prefect-ray and ray: pip install -e '.[ray]'") from None
        return RayTaskRunner(address=pc.ray_address, init_kwargs=dict(pc.ray_init) or None)
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=pc.max_workers)


def run_sharded_stage(stage: str, config: Config, raw_config: dict, base_dir: str, workspace: str, upstream: dict[str, str],
                      force: bool = False) -> dict:
    """A sharded stage inside a flow (``Stage.run`` with ``run_shards``): its unfinished
    shards fan out as `shard` tasks on the configured task runner, then the shards
    become the stage output. Shards finished by an earlier (killed) run are not redone."""
    workers: list[str] = []
    nodes: dict[str, str] = {}  # shard task -> the Ray node it ran on

    def fan_out(shard_plan: ShardPlan) -> None:
        todo = shard_plan.todo()
        shard = run_shard.with_options(retries=config.prefect.retries_for(stage), retry_delay_seconds=config.prefect.retry_delay_seconds,
                                       retry_condition_fn=retry_unless_bad_input)
        with task_runner_for(config) as runner:
            futures = [runner.submit(shard.with_options(task_run_name=f"{stage}-shard-{i:05d}"),
                                     parameters={"stage": stage, "raw_config": raw_config, "base_dir": base_dir,
                                                 "shard_plan": shard_plan.for_shard(i), "index": i})
                       for i in todo]
            try:
                wait(futures)  # every shard ends (done or failed after its retries) before a failure ends the stage
            except BaseException as exc:  # a signal (Prefect's TerminationSignal, KeyboardInterrupt): the shards stop now
                if not isinstance(exc, Exception):
                    interrupt.request_stop(getattr(exc, "signal", None) or signal.SIGTERM)
                raise
            done = [f.result() for f in futures]  # raises the first failed shard's error
        workers.extend(sorted({d["worker"] for d in done}))
        nodes.update({f"{stage}-shard-{i:05d}": d.get("node") for i, d in zip(todo, done) if d.get("node")})
        log.info("%s: %d of %d shards as tasks on %s (%d worker process%s)", stage, len(todo), len(shard_plan.shards),
                 config.prefect.task_runner, len(workers), "" if len(workers) == 1 else "es")

    out, reused = REGISTRY[stage].run(config, Store(workspace), load_upstream(upstream), force, run_shards=fan_out)
    return _result(stage, out, reused, shard_workers=workers, **({"shard_nodes": nodes} if nodes else {}))
