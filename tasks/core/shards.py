"""Sharded stages: the work of `rollouts`, `explain`, `hint` and `grade` cut into
shards that a crashed run resumes from and that a flow can fan out as Prefect tasks.

A sharded stage (``Stage(sharded=True)``, tasks/core/stage.py) has in its module,
besides ``settings`` and ``inputs``:

- ``plan(job) -> ShardPlan``: what is to be done, cut into shards whose items
  carry everything a shard needs (deterministic: a re-run after a crash gets the
  same plan and finds its finished shards);
- ``run_shard(config, shard_plan, i) -> dict``: do shard ``i`` (from its items
  alone: a shard task is sent ``shard_plan.for_shard(i)``) and write it
  with ``shard_plan.write`` (its rows, and a small JSON of counts the summary
  needs); returns those counts;
- ``assemble(job, shard_plan) -> StageOutput``: the finished shards as the stage
  output (``job.write``);
- optionally ``teardown()``: called once its shards are done, however they ended
  (the sampling stages free the process's shared policy backends).

The process that runs a stage holds the store's lock on its output
(``Store.lock``, taken by ``Stage.run``) from the reuse check to the written
output, so two runs of the same output never share a work directory: the
second waits and reuses.

A shard is written as ``<store>/<stage>/.work-<key>/shard-NNNNN.json`` then
``shard-NNNNN.parquet``, each to a temporary name and renamed; a shard is
finished when its Parquet file exists. The work directory goes once the stage
output is written; ``guidedrl gc`` removes the ones crashed runs left behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core import interrupt
from tasks.core.faults import fault
from tasks.core.schemas import to_table, validate_table
from tasks.core.store import StageOutput, write_parquet
from tasks.core import progress

if TYPE_CHECKING:
    from tasks.core.stage import Job

log = logging.getLogger("guidedrl.shards")


@dataclass
class ShardPlan:
    """One stage's work cut into shards of items (problem rows; problems with their prompts and hints; traces)."""

    stage: str
    key: str
    stage_cfg: dict
    inputs: dict
    workspace: Path
    work: Path
    #: each shard's items carry everything the shard needs (a shard task gets only its own)
    shards: list[list[Any]]
    #: what ``assemble`` needs beyond the shards' rows (stuck problems, levels, ...); shard tasks do not get it
    context: dict = field(default_factory=dict)
    #: the upstream outputs (stage -> path) that shards whose items are row ranges read their rows from; shard tasks get it
    sources: dict[str, Path] = field(default_factory=dict)
    #: look up each problem's rows in the store's earlier outputs (tasks/core/reuse.py); off for a forced run
    reuse: bool = True

    def for_shard(self, i: int) -> "ShardPlan":
        """This plan with only shard ``i``'s items and no context: what a shard task is sent."""
        return replace(self, shards=[items if j == i else [] for j, items in enumerate(self.shards)], context={})

    def path(self, i: int) -> Path:
        return self.work / f"shard-{i:05d}.parquet"

    def meta_path(self, i: int) -> Path:
        return self.work / f"shard-{i:05d}.json"

    def finished(self, i: int) -> bool:
        return self.path(i).exists()

    def todo(self) -> list[int]:
        return [i for i in range(len(self.shards)) if not self.finished(i)]

    def done(self) -> int:
        return len(self.shards) - len(self.todo())

    def failed_path(self, i: int) -> Path:
        return self.work / f"shard-{i:05d}.failed.json"

    def fail(self, i: int, meta: dict) -> None:
        """Record that shard ``i``'s generation failed (its counts and first error; no rows): the shard stays
        unfinished, so the next run regenerates it."""
        tmp = self.failed_path(i).with_name(f".{self.failed_path(i).name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(meta, sort_keys=True))
        os.rename(tmp, self.failed_path(i))

    def failures(self) -> list[dict]:
        """The failure records of the shards that are still unfinished."""
        return [json.loads(self.failed_path(i).read_text()) for i in range(len(self.shards))
                if not self.finished(i) and self.failed_path(i).exists()]

    def write(self, i: int, table: pa.Table, meta: dict | None = None) -> None:
        """Shard ``i``'s rows and counts, each written to a temporary name and renamed (counts first)."""
        self.failed_path(i).unlink(missing_ok=True)
        meta_tmp = self.meta_path(i).with_name(f".{self.meta_path(i).name}.{os.getpid()}.tmp")
        meta_tmp.write_text(json.dumps(meta or {}, sort_keys=True))
        os.rename(meta_tmp, self.meta_path(i))
        write_shard(self.path(i), table, self.stage)
        fault("shard.after", self.stage)

    def tables(self, schema: str) -> list[pa.Table]:
        """The finished shards' rows, each checked against ``schema``, all with one
        Arrow schema (a shard without rows has no extra columns; they come back as
        nulls); one empty table when there are no shards."""
        parts = []
        for i in range(len(self.shards)):
            table = pq.read_table(self.path(i))
            validate_table(table, schema, self.path(i))
            parts.append(table)
        return aligned(parts) if parts else [to_table([], schema, f"{self.stage}/{schema}")]

    def parts(self, schema: str) -> list[pa.Table | Path]:
        """The finished shards as the parts of a dataset: their Parquet files as they are (each
        schema checked from its metadata, no rows read) when all have one Arrow schema, else
        ``tables(schema)`` (aligned in memory)."""
        paths = [self.path(i) for i in range(len(self.shards))]
        schemas = [pq.read_schema(p) for p in paths]
        if not paths or any(not s.equals(schemas[0]) for s in schemas[1:]):
            return self.tables(schema)
        for path, s in zip(paths, schemas):
            validate_table(s.empty_table(), schema, path)
        return paths

    @staticmethod
    def columns(parts: list[pa.Table | Path], names: list[str]) -> pa.Table:
        """Only these columns of the parts (files read column-wise), for an assembly's summary."""
        return pa.concat_tables([pq.read_table(p, columns=names) if isinstance(p, Path) else p.select(names) for p in parts])

    def metas(self) -> list[dict]:
        return [json.loads(self.meta_path(i).read_text()) for i in range(len(self.shards))]

    def total(self, name: str) -> float:
        """A count summed over the shards' metas."""
        return sum(m.get(name, 0) for m in self.metas())

    def clean(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


def aligned(parts: list[pa.Table]) -> list[pa.Table]:
    """The tables with the union of their columns, in the first one's order (missing ones null)."""
    schema = pa.unify_schemas([p.schema for p in parts], promote_options="permissive")
    return [pa.Table.from_arrays([p.column(f.name).cast(f.type) if f.name in p.column_names else pa.nulls(p.num_rows, f.type)
                                  for f in schema], schema=schema) for p in parts]


def write_shard(path: Path, table: pa.Table, stage: str | None = None) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write_parquet(table, tmp)
    fault("shard.before-rename", stage)
    os.rename(tmp, path)


def make_plan(job: "Job", items: Sequence, shard_size: int | None, context: dict | None = None,
              sources: dict[str, Path] | None = None) -> ShardPlan:
    """``items`` (a list, or a ``range`` of row numbers read from ``sources``) cut into shards
    of ``shard_size`` (None: one shard), in ``<store>/<stage>/.work-<key>``."""
    work = job.store.root / job.name / f".work-{job.key}"
    work.mkdir(parents=True, exist_ok=True)
    size = shard_size or max(1, len(items))
    shards = [items[i : i + size] for i in range(0, len(items), size)]
    return ShardPlan(job.name, job.key, job.settings, job.inputs, job.store.workspace, work, shards, context or {}, sources or {},
                     reuse=not job.force)


def run_stage(job: "Job", run_shards: Callable[[ShardPlan], None] | None = None) -> StageOutput:
    """A sharded stage: its unfinished shards done by ``run_shards`` (default: one
    after another in this process, with a progress bar; a flow fans them out as
    Prefect tasks), then assembled. Finished shards are not redone. The caller
    (``Stage.run``) holds the store's lock on the output, so two runs of the same
    output never share a work directory."""
    module, name = job.stage.impl, job.name
    shard_plan = module.plan(job)
    if shard_plan.done():
        log.info("%s: resuming at shard %d of %d (%s)", name, shard_plan.done(), len(shard_plan.shards), shard_plan.work)

    def in_turn(shard_plan: ShardPlan) -> None:
        items = sum(map(len, shard_plan.shards))
        for i in progress.track(range(len(shard_plan.shards)), f"{name}: {items} items in {len(shard_plan.shards)} shards"):
            interrupt.check()  # a stop requested (SIGTERM / SIGINT): no new shard starts
            if not shard_plan.finished(i):
                module.run_shard(job.config, shard_plan, i)

    try:
        (run_shards or in_turn)(shard_plan)
    finally:
        getattr(module, "teardown", lambda: None)()
    check_generation(job, shard_plan)
    return module.assemble(job, shard_plan)


# --------------------------------------------------------------------------- failed generations


class GenerationFailed(RuntimeError):
    """A sampling stage whose failed generations exceed `policy.max_error_fraction`: nothing is published."""

    @classmethod
    def of(cls, stage: str, errored: int, prompts: int, where: str, fraction: float, first: str | None, after: str = ""
           ) -> "GenerationFailed":
        """The one line: the stage, the count, the server, the setting, the first error, what was kept."""
        return cls(f"{stage}: generation failed for {errored} of {prompts} prompts at {where} (policy.max_error_fraction "
                   f"{fraction}); first error: {first} — nothing published{after}")


def generation_meta(samples: list[list]) -> dict:
    """A shard's counts of its prompts and of those whose generation failed (any sample with finish_reason
    ``error``), the first error, and where its token ids came from (``tokens_from``: source -> samples)."""
    errored = [s.error for group in samples for s in group if s.finish_reason == "error"]
    failed_prompts = sum(any(s.finish_reason == "error" for s in group) for group in samples)
    sources: dict[str, int] = {}
    for group in samples:
        for k, v in group_tokens_from(group).items():
            sources[k] = sources.get(k, 0) + v
    return {"prompts": len(samples), "errored_prompts": failed_prompts, "errored_samples": len(errored),
            "first_error": errored[0] if errored else None, "tokens_from": sources}


def group_tokens_from(group: list) -> dict[str, int]:
    """One prompt's samples by where their token ids came from (failed generations left out)."""
    sources: dict[str, int] = {}
    for s in group:
        if s.finish_reason != "error":
            sources[s.token_source] = sources.get(s.token_source, 0) + 1
    return sources


def write_or_fail(shard_plan: ShardPlan, i: int, table: pa.Table, meta: dict, max_error_fraction: float) -> dict:
    """Write shard ``i`` — unless its generation failed for some prompt and no failure is tolerated
    (`policy.max_error_fraction` 0): then only a failure record, so a failure never becomes data and the
    next run regenerates the shard."""
    if meta.get("errored_prompts") and not max_error_fraction:
        shard_plan.fail(i, meta)
        log.warning("%s: shard %d: generation failed for %d of %d prompts (%s); the shard is not kept", shard_plan.stage, i,
                    meta["errored_prompts"], meta["prompts"], meta.get("first_error"))
    else:
        shard_plan.write(i, table, meta)
    return meta


def tokens_from(shard_plan: ShardPlan) -> dict[str, int]:
    """Samples by where their token ids came from, over the finished shards."""
    total: dict[str, int] = {}
    for m in shard_plan.metas():
        for k, v in (m.get("tokens_from") or {}).items():
            total[k] = total.get(k, 0) + v
    return dict(sorted(total.items()))


def check_generation(job: "Job", shard_plan: ShardPlan) -> None:
    """Fail the stage — publishing nothing — when its failed generations exceed `policy.max_error_fraction` of its
    prompts: one line naming the server, the count and the first error. Shards without errors are kept (the re-run
    regenerates only the others); finished shards with errors are removed when the stage fails."""
    finished = [(i, json.loads(shard_plan.meta_path(i).read_text())) for i in range(len(shard_plan.shards)) if shard_plan.finished(i)]
    failed = shard_plan.failures()
    metas = [m for _, m in finished] + failed
    prompts = sum(m.get("prompts", 0) for m in metas)
    errored = sum(m.get("errored_prompts", 0) for m in metas)
    if not errored:
        return
    policy = job.config.policy
    if not failed and errored <= policy.max_error_fraction * prompts:
        log.warning("%s: generation failed for %d of %d prompts, within policy.max_error_fraction %s: those rows are kept as "
                    "errors (counted apart, never data)", job.name, errored, prompts, policy.max_error_fraction)
        return
    for i, m in finished:  # the errored shards are regenerated by the next run
        if m.get("errored_prompts"):
            shard_plan.path(i).unlink(missing_ok=True)
    first = next(m["first_error"] for m in metas if m.get("first_error"))
    where = ((policy.base_url or os.environ.get("OPENAI_BASE_URL") or "the policy server") if policy.backend == "openai"
             else f"the {policy.backend} backend")
    kept = len(shard_plan.shards) - len(shard_plan.todo())
    raise GenerationFailed.of(job.name, errored, prompts, where, policy.max_error_fraction, first,
                              f"; {kept} finished shards without errors kept: re-run once the server answers and only the "
                              "failed ones are regenerated")
