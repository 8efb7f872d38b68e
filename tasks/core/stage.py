"""A stage declares itself where it lives: one `Stage` record at the top of its module
(tasks/stages/<name>.py), collected by tasks/registry.py.

The record says what the pipeline needs to know without reading the stage's code:
its name and version, the stages it reads (required, and optional: read when they
ran), the datasets it writes with their schemas, the config section it owns and
its settings model, whether its work is cut into shards, and whether it runs in
every round of `guidedrl online`.

The module provides the stage's functions; `Stage.run` does the part every stage
shares — key, reuse check, then the work — so a module holds only its method:

- ``settings(config) -> dict``: the part of the config its output depends on
  (runtime-only settings such as concurrency stay out);
- ``inputs(config, upstream) -> dict``: what it reads, fingerprinted;
- ``compute(job) -> StageOutput``: the work, written with ``job.write``; or, for
  a sharded stage, ``plan(job)``, ``run_shard(config, shard_plan, i)`` and
  ``assemble(job, shard_plan)`` (tasks/core/shards.py);
- optionally ``describe(summary) -> str`` (one line for the CLI and the report)
  and ``dry_run(config, store, upstream)`` (judge stages: what they would send).
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Mapping

from tasks.core import owner
from tasks.core.config import BaseConfig
from tasks.core.store import StageOutput, Store, stage_key

if TYPE_CHECKING:
    from tasks.core.shards import ShardPlan

log = logging.getLogger("guidedrl.stage")


@dataclass(frozen=True)
class Stage:
    name: str
    version: str
    #: the module with the stage's functions (its ``__name__``)
    module: str
    upstream: tuple[str, ...] = ()
    #: read when they ran in the same run (eval measures the dpo and grpo checkpoints)
    optional_upstream: tuple[str, ...] = ()
    #: dataset name -> schema name (tasks/core/schemas.py) of what it writes
    writes: Mapping[str, str] = field(default_factory=dict)
    #: directories it writes besides datasets (a checkpoint)
    directories: tuple[str, ...] = ()
    #: the config section the stage owns (dotted: "train.grpo") and its pydantic model
    section: str | None = None
    settings_model: type | None = None
    sharded: bool = False
    #: runs in every round of `guidedrl online` (curate runs once; dpo is offline)
    online: bool = True

    @property
    def impl(self) -> ModuleType:
        return importlib.import_module(self.module)

    def key_for(self, config: BaseConfig, upstream: dict[str, StageOutput]) -> tuple[str, dict, dict]:
        """(store key, the settings the output depends on, input fingerprints)."""
        settings = self.impl.settings(config)
        inputs = self.impl.inputs(config, upstream)
        return stage_key(self.name, settings, inputs, self.version), settings, inputs

    def run(self, config: BaseConfig, store: Store, upstream: dict[str, StageOutput] | None = None, force: bool = False,
            run_shards: Callable[["ShardPlan"], None] | None = None) -> tuple[StageOutput, bool]:
        """The stage's output: the stored one when it exists (``reused`` True) unless
        ``force``, else computed now. Plain function: no Prefect needed."""
        owner.configure(config.store.heartbeat_seconds, config.store.lease_seconds)
        job = Job(self, config, store, dict(upstream or {}), *self.key_for(config, upstream or {}), force=force)
        # one process works towards an output at a time: a second run of the same output
        # (another run on this workspace) waits here, then finds it finished and reuses it
        with store.lock(self.name, job.key):
            existing = store.reusable(self.name, job.key, force)
            if existing is not None:
                return existing, True
            for out in job.upstream.values():  # a changed input is never read as if it were whole
                out.verify()
            if self.sharded:
                from tasks.core.shards import run_stage

                out = run_stage(job, run_shards)
            else:
                out = self.impl.compute(job)
        self.check_output(out)
        return out, False

    def check_output(self, out: StageOutput) -> None:
        """The output holds what the stage declares it writes."""
        missing = [n for n in self.writes if n not in out.manifest.get("datasets", {})]
        missing += [d for d in self.directories if not (out.path / d).is_dir()]
        if missing:
            raise RuntimeError(f"stage {self.name} declares {missing} but its output {out.path} lacks them")

    def describe(self, summary: dict) -> str:
        """One line about an output of this stage, from its summary."""
        fn = getattr(self.impl, "describe", None)
        line = fn(summary) if fn else json.dumps(summary)[:120]
        if summary.get("empty_inputs"):
            line += f" — empty input: {', '.join(summary['empty_inputs'])}"
        return line


@dataclass
class Job:
    """One computation of a stage: its config, store, upstream outputs, key and settings."""

    stage: Stage
    config: BaseConfig
    store: Store
    upstream: dict[str, StageOutput]
    key: str
    settings: dict
    inputs: dict
    force: bool = False

    @property
    def name(self) -> str:
        return self.stage.name

    def write(self, datasets: Mapping[str, Any], summary: dict, **kwargs: Any) -> StageOutput:
        """Write the stage output: ``datasets`` maps each declared dataset name to its
        table (or list of part tables); schemas come from the stage's declaration."""
        unknown = sorted(set(datasets) - set(self.stage.writes))
        if unknown:
            raise ValueError(f"stage {self.name} writes {unknown}, which it does not declare (writes: {dict(self.stage.writes)})")
        empty = self.empty_inputs()
        if empty:
            log.warning("%s: its input %s has no rows; its output says so (summary: empty_inputs)", self.name, ", ".join(empty))
        return self.store.write(self.name, self.key, {n: (self.stage.writes[n], t) for n, t in datasets.items()},
                                config=self.settings, inputs=self.inputs, stage_version=self.stage.version,
                                summary={**summary, **({"empty_inputs": empty} if empty else {})}, replace=self.force, **kwargs)

    def empty_inputs(self) -> list[str]:
        """The upstream datasets (``stage/dataset``) with no rows; rejection lists do not count."""
        return [f"{stage}/{name}" for stage, out in sorted(self.upstream.items())
                for name, d in out.manifest.get("datasets", {}).items() if d.get("num_rows") == 0 and d.get("kind") != "rejected"]

    def scratch(self):
        """A temporary directory in the store (for checkpoints and charts before they are written)."""
        return self.store.scratch(self.name)

    @property
    def workspace(self) -> Path:
        return self.store.workspace
