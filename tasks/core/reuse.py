"""Reuse of sampled rows across stage outputs: a night costs what changed.

A stage that samples (`rollouts`, `explain`, `hint`) gives every problem of a shard a
``problem_key``: the hash of everything its rows depend on — the stage and its
version, the policy fingerprint and backend, the sampling settings, the per-sample
seeds (tasks/models/sampling.py), the rendered prompt (and the guidance-free prompt
the loss side is scored under), the problem as checked, and the stage's own settings
that change which rows are kept. Its rows are the same whatever else is in the run
(rows do not depend on shard layout or batch-mates), so a problem whose key is in
the store is not sampled again: its rows are copied from the newest output holding
them, through the same row-building path as sampled rows (byte-identical to a
recompute). Problems with a failed generation are never indexed (they are sampled
again).

Each output of such a stage carries ``reuse/index.parquet``: one row per problem —
``problem_key``, ``problem_id``, ``policy_id``, the part file and row range of its
rows, and its counts (``counts``, JSON: what the stage's summary sums, e.g. samples
drawn before keeping the verified ones). `guidedrl gc` keeps, for every key of the
policies the kept runs sampled with, the newest output that holds it.
"""

from __future__ import annotations

import datetime
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core.store import MANIFEST, TMP_PREFIX, canonical_json, sha256_bytes

if TYPE_CHECKING:
    from tasks.core.shards import ShardPlan
    from tasks.core.stage import Job
    from tasks.core.store import Store

log = logging.getLogger("guidedrl.reuse")

INDEX_DIR = "reuse"
INDEX_FILE = "index.parquet"
INDEX_SCHEMA = pa.schema([
    pa.field("problem_key", pa.string()),
    pa.field("problem_id", pa.string()),
    pa.field("policy_id", pa.string()),
    pa.field("part", pa.string()),  # relative to the output directory
    pa.field("row_start", pa.int64()),
    pa.field("num_rows", pa.int64()),
    pa.field("counts", pa.string()),
    pa.field("created", pa.string()),  # the output's creation time: the newest holder of a key wins
])


def problem_key(**parts) -> str:
    """The per-problem key: a hash of the named parts (canonical JSON)."""
    return sha256_bytes(canonical_json(parts).encode())[:32]


def key_for(stage, policy: dict, params, seeds: list[int], prompt: str, problem: dict, **extra) -> str:
    """The ``problem_key`` of one problem's rows in a sampling stage (``stage``: its ``Stage`` record): the stage
    and version, the policy (``policy``: its fingerprint, backend and precision — tasks/models/policy.py
    ``policy_key``), the sampling settings and seeds, the prompt, the problem as checked, and ``extra`` (the
    loss-side prompt, the stage's settings that change the kept rows)."""
    return problem_key(stage=stage.name, version=stage.version, **policy, n=params.n, temperature=params.temperature, top_p=params.top_p,
                       max_new_tokens=params.max_new_tokens, seeds=list(seeds), prompt_sha256=sha256_bytes(prompt.encode()),
                       problem=problem_fields(problem), **extra)


def problem_fields(problem: dict) -> dict:
    """What of a problem row its checked rows depend on: its id, question, answer, reference, level and metadata
    (a reasoning-gym entry is checked by its scorer) — not its source's name, its position in the source
    (``metadata.source_index``: a file that grows or is reordered moves it) or the split it was put in."""
    meta = problem.get("metadata")
    try:
        parsed = json.loads(meta) if isinstance(meta, str) else meta
    except ValueError:
        parsed = meta
    if isinstance(parsed, dict):
        parsed = {k: v for k, v in parsed.items() if k != "source_index"}
    return {**{k: v for k, v in problem.items() if k not in ("split", "source", "metadata")}, "metadata": parsed}


@dataclass(frozen=True)
class Found:
    """Where a problem's rows are: a part file of an earlier output and a row range, with its counts."""

    part: Path
    row_start: int
    num_rows: int
    counts: dict
    problem_id: str


def index_files(root: Path, stage: str) -> list[Path]:
    """The reuse indexes of the finished outputs of ``stage`` (temporaries and crashed writers' leftovers not)."""
    return sorted(p for p in (root / stage).glob(f"*/{INDEX_DIR}/{INDEX_FILE}")
                  if not p.parent.parent.name.startswith((TMP_PREFIX, ".")) and (p.parent.parent / MANIFEST).is_file())


def lookup(root: Path, stage: str, keys: Sequence[str]) -> dict[str, Found]:
    """The newest stored rows of each of ``keys`` that has any (keys not found are left out)."""
    import polars as pl

    files = index_files(root, stage)
    if not files or not keys:
        return {}
    frame = (pl.scan_parquet([str(f) for f in files], include_file_paths="index_path")
             .filter(pl.col("problem_key").is_in(list(set(keys))))
             .sort(["created", "index_path"], descending=True)
             .unique("problem_key", keep="first")
             .collect())
    found = {}
    for r in frame.iter_rows(named=True):
        output = Path(r["index_path"]).parent.parent
        part = output / r["part"]
        if r["num_rows"] == 0 or part.is_file():  # a part removed since: sample again
            found[r["problem_key"]] = Found(part, r["row_start"], r["num_rows"], json.loads(r["counts"]), r["problem_id"])
    return found


def read_found(found: Sequence[Found]) -> list[list[dict]] | None:
    """Each found problem's rows as dicts (each part file read once); None when a part no longer holds what its
    index says (the caller samples those problems again)."""
    tables: dict[Path, pa.Table] = {}
    out = []
    for f in found:
        if not f.num_rows:  # a problem with no rows kept (eval keeps only counts)
            out.append([])
            continue
        if f.part not in tables:
            tables[f.part] = pq.read_table(f.part)
        rows = tables[f.part].slice(f.row_start, f.num_rows).to_pylist()
        if len(rows) != f.num_rows or any(r["problem_id"] != f.problem_id for r in rows):
            return None
        out.append(rows)
    return out


@dataclass
class Sampled:
    """What a stage's sampling gave for some problems of a shard."""

    rows: list[list[dict]]  # per problem asked for, in that order: the rows to write
    counts: list[dict]  # per problem: what the stage's summary sums (numbers; ``tokens_from``: source -> samples)
    reusable: list[bool]  # per problem: no failed generation (a problem with one is sampled again next time)
    meta: dict  # the shard's generation meta of what was sampled (generation_meta, server, time)


def add_counts(total: dict, counts: dict) -> None:
    """Sum ``counts`` into ``total``: numbers add, ``tokens_from``-like dicts add per key, other values: the first kept."""
    for k, v in counts.items():
        if isinstance(v, bool) or not isinstance(v, (int, float, dict)):
            if v is not None and total.get(k) is None:
                total[k] = v
        elif isinstance(v, dict):
            into = total.setdefault(k, {})
            for kk, vv in v.items():
                into[kk] = into.get(kk, 0) + vv
        else:
            total[k] = total.get(k, 0) + v


def run_shard(shard_plan: "ShardPlan", i: int, keys: list[str], problem_ids: list[str], sample: Callable[[list[int]], Sampled],
              to_table: Callable[[list[dict]], pa.Table], max_error_fraction: float, extra_meta: dict | None = None) -> dict:
    """Shard ``i``: the problems whose key is in the store copied from there, the others sampled
    (``sample(indices)``), their rows written in the shard's problem order; the shard's meta records
    per problem its key, row count and counts (assembled into the output's index), and how many
    problems were reused and sampled."""
    from tasks.core.shards import write_or_fail

    found = lookup(shard_plan.workspace / "store", shard_plan.stage, keys) if shard_plan.reuse else {}
    hits = [k for k, key in enumerate(keys) if key in found]
    reused_rows = read_found([found[keys[k]] for k in hits]) if hits else []
    if reused_rows is None:
        log.warning("%s: shard %d: stored rows no longer match their index; sampling those problems again", shard_plan.stage, i)
        hits, reused_rows = [], []
    todo = [k for k in range(len(keys)) if k not in set(hits)]
    sampled = sample(todo) if todo else Sampled([], [], [], {"prompts": 0, "errored_prompts": 0, "errored_samples": 0,
                                                             "first_error": None})
    by_problem: dict[int, tuple[list[dict], dict, bool]] = {k: (rows, found[keys[k]].counts, True) for k, rows in zip(hits, reused_rows)}
    by_problem.update({k: (rows, counts, ok) for k, rows, counts, ok in zip(todo, sampled.rows, sampled.counts, sampled.reusable)})
    rows, problems, totals = [], [], {}
    for k in range(len(keys)):
        problem_rows, counts, ok = by_problem[k]
        rows.extend(problem_rows)
        problems.append({"problem_key": keys[k] if ok else None, "problem_id": problem_ids[k], "num_rows": len(problem_rows),
                         "counts": counts})
        add_counts(totals, counts)
    meta = {**sampled.meta, **totals, **(extra_meta or {}), "problems": problems, "reused_problems": len(hits),
            "sampled_problems": len(todo)}
    return write_or_fail(shard_plan, i, to_table(rows), meta, max_error_fraction)


def write_entries(entries: Sequence[dict], into: Path) -> None:
    """A reuse index (``into/index.parquet``): one entry per problem (``INDEX_SCHEMA``'s fields but ``created``)."""
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")
    cols: dict[str, list] = {f.name: [] for f in INDEX_SCHEMA}
    for e in entries:
        for name in cols:
            cols[name].append(created if name == "created" else json.dumps(e[name], sort_keys=True) if name == "counts" else e[name])
    into.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pydict(cols, schema=INDEX_SCHEMA), into / INDEX_FILE)


def write_index(shard_plan: "ShardPlan", dataset: str, policy_id: str, into: Path) -> None:
    """The output's reuse index, from the shards' metas (part ``i`` of ``dataset`` is shard ``i``)."""
    entries = []
    for i, meta in enumerate(shard_plan.metas()):
        start = 0
        for p in meta.get("problems", []):
            if p["problem_key"]:
                entries.append({"problem_key": p["problem_key"], "problem_id": p["problem_id"], "policy_id": policy_id,
                                "part": f"{dataset}/data/part-{i:05d}.parquet", "row_start": start, "num_rows": p["num_rows"],
                                "counts": p["counts"]})
            start += p["num_rows"]
    write_entries(entries, into)


def reuse_summary(shard_plan: "ShardPlan") -> dict:
    """How many problems the stage copied from earlier outputs and how many it sampled."""
    return {"reused_problems": int(shard_plan.total("reused_problems")), "sampled_problems": int(shard_plan.total("sampled_problems"))}


def reuse_note(s: dict) -> str:
    """What a sampling stage's one-line description adds: problems reused from the store, problems sampled."""
    if "reused_problems" not in s:
        return ""
    return f"; problems sampled {s['sampled_problems']}, reused {s['reused_problems']}"


def write_output(job: "Job", shard_plan: "ShardPlan", datasets: dict, summary: dict, dataset: str, policy_id: str, **kwargs):
    """``job.write`` with the output's reuse index (``reuse/``, its rows under ``policy_id``) beside its datasets."""
    counts = reuse_summary(shard_plan)
    if counts["reused_problems"]:
        log.info("%s: %d problems' rows copied from earlier outputs (same policy, prompt, settings and seeds), %d sampled",
                 job.name, counts["reused_problems"], counts["sampled_problems"])
    with job.scratch() as tmp:
        write_index(shard_plan, dataset, policy_id, tmp / INDEX_DIR)
        return job.write(datasets, {**summary, **counts}, directories={INDEX_DIR: tmp / INDEX_DIR}, **kwargs)


def latest_holders(store: "Store", policy_ids: set[str] | None = None) -> set[Path]:
    """The outputs (of every stage with a reuse index) that hold the newest rows of some problem key — of the
    ``policy_ids`` only, when given: what the next night would reuse."""
    import polars as pl

    keep: set[Path] = set()
    for stage_dir in sorted(p for p in store.root.glob("*") if p.is_dir()):
        files = index_files(store.root, stage_dir.name)
        if not files:
            continue
        lf = pl.scan_parquet([str(f) for f in files], include_file_paths="index_path")
        if policy_ids is not None:
            lf = lf.filter(pl.col("policy_id").is_in(sorted(policy_ids)))
        newest = (lf.sort(["created", "index_path"], descending=True).unique("problem_key", keep="first")
                  .select(pl.col("index_path").unique()).collect().to_series().to_list())
        keep.update(Path(p).parent.parent.resolve() for p in newest)
    return keep


def policies_of(outputs: Sequence[Path]) -> set[str]:
    """The policy ids in the reuse indexes of these outputs."""
    ids: set[str] = set()
    for out in outputs:
        f = Path(out) / INDEX_DIR / INDEX_FILE
        if f.is_file():
            ids.update(pq.read_table(f, columns=["policy_id"]).column("policy_id").to_pylist())
    return ids
