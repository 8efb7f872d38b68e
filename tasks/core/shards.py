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
  output (``job.write``).

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

from tasks.core.faults import fault
from tasks.core.schemas import to_table, validate_table
from tasks.core.store import StageOutput, write_parquet
from tasks.models.policy import release_backends
from tasks.report import progress

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

    def write(self, i: int, table: pa.Table, meta: dict | None = None) -> None:
        """Shard ``i``'s rows and counts, each written to a temporary name and renamed (counts first)."""
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
    return ShardPlan(job.name, job.key, job.settings, job.inputs, job.store.workspace, work, shards, context or {}, sources or {})


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
            if not shard_plan.finished(i):
                module.run_shard(job.config, shard_plan, i)

    try:
        (run_shards or in_turn)(shard_plan)
    finally:
        release_backends()
    return module.assemble(job, shard_plan)
