"""Benchmark: seconds and peak memory of the streamed steps at growing scale, against a bare
polars/pyarrow pass doing the same arithmetic in the same run (issue 15).

    python bench/scale.py [--n 16384,131072] [--tokens 1024] [--samples 16] [--repeat 3] [--out bench/results/scale-DATE.md]

For each N it writes synthetic stage outputs (seeded; its own generator, part by part so the
generator never holds them): curate `problems` (N / samples problems) and `rollouts` (N traces,
`--tokens` completion token ids and two log-prob lists each, 20% correct), in the store's
layout (manifests, fingerprints). Then, each in a fresh child process whose peak RSS is read
from the kernel (ru_maxrss):

- curate: `tasks.stages.curate.curate_parts` on a JSONL file of N problems (validation, dedup,
  decontamination against a 5% eval split, parts written as it goes) — vs a bare polars pass
  doing the same steps as vectorised queries (normalised key, dedup, hash split, word 8-grams,
  eval-overlap share, sink Parquet; no NFKC, no per-source template n-grams, no rejection rows);
- filter: `tasks.stages.filter.filter_problems` over the scanned outputs + `conform`, written
  as Parquet — vs a bare polars group-by of the same four columns sunk to Parquet;
- datasets show: `tasks.core.store.open_dataset` (fingerprint hashed in chunks, schema and
  rows from metadata) + the first 5 rows — vs pyarrow hashing the files and reading the footer;
- datasets diff: `tasks.core.share.describe` (per-column statistics in streaming polars
  queries) — vs the same statistics as one plain polars query (the default engine);
- the in-memory way (what filter did before: the four columns read into Python dicts) as a
  third line, for scale.

- materialize: the stage's ``compute`` (chunks of whole problems, tasks/core/groups.py) on
  rollouts + explanations + hints + grades — vs a bare polars pass that joins the grades,
  computes the group advantages with window expressions and sinks the GRPO columns;
- grade (rule judge): the stage run (row-range shards of `judge.shard_size`, each reading its
  own traces) — vs the same rule judge over one pyarrow scan of the rollouts, written as it goes.

- grpo data loading: one epoch of the update's minibatches (tasks/stages/grpo.py: GRPORows through
  its 4,096-row shuffle buffer) over the materialize step's grpo files, without the model — vs
  reading the same columns once as rows, per-token values as NumPy views (pyarrow batches, no shuffle).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PART_ROWS = 8192


def _write_output(ws: Path, stage: str, name: str, kind: str, parts) -> Path:
    """A stage output in the store's layout from an iterator of Arrow tables (written one by one)."""
    import pyarrow.parquet as pq

    from tasks.core.store import fingerprint_dataset, write_parquet

    out = ws / "store" / stage / f"bench{stage}"
    data = out / name / "data"
    data.mkdir(parents=True)
    rows = 0
    for i, table in enumerate(parts):
        write_parquet(table, data / f"part-{i:05d}.parquet")
        rows += table.num_rows
    fp = fingerprint_dataset(out / name)
    schema = pq.read_schema(next(data.glob("*.parquet")))
    (out / name / "manifest.json").write_text(json.dumps({
        "kind": kind, "num_rows": rows, "fingerprint": fp, "name": name, "stage": stage,
        "files": [f"data/{p.name}" for p in sorted(data.glob("*.parquet"))],
        "columns": [{"name": f.name, "type": str(f.type)} for f in schema]}))
    (out / "manifest.json").write_text(json.dumps({"stage": stage, "stage_key": out.name,
                                                   "datasets": {name: {"kind": kind, "fingerprint": fp, "num_rows": rows}}}))
    return out


def generate(ws: Path, n: int, tokens: int, samples: int, seed: int = 0) -> None:
    import numpy as np
    import pyarrow as pa

    from tasks.core.schemas import conform

    rng = np.random.default_rng(seed)
    n_problems = max(1, n // samples)
    pids = [f"p{i:08d}" for i in range(n_problems)]
    levels = np.array(["easy", "hard"])[rng.integers(0, 2, n_problems)]

    def problems():
        for s in range(0, n_problems, PART_ROWS):
            ids = pids[s:s + PART_ROWS]
            yield conform(pa.table({
                "problem_id": ids, "question": [f"What is {i} + {i}?" for i in range(s, s + len(ids))],
                "answer": [str(2 * i) for i in range(s, s + len(ids))], "reference_solution": [f"{i} + {i} = {2 * i}" for i in range(s, s + len(ids))],
                "source": ["bench"] * len(ids), "level": levels[s:s + len(ids)].tolist(), "split": ["train"] * len(ids),
                "metadata": ["{}"] * len(ids)}), "problems")

    def table(idx, problem, kind="plain", correct=None):
        m = len(idx)
        offsets = pa.array(np.arange(0, (m + 1) * tokens, tokens, dtype=np.int32))
        ids = pa.ListArray.from_arrays(offsets, pa.array(rng.integers(0, 100, m * tokens, dtype=np.int32)))
        lp = lambda: pa.ListArray.from_arrays(offsets, pa.array(-rng.random(m * tokens, dtype=np.float32)))  # noqa: E731
        level = {p: lv for p, lv in zip(pids, levels)} if m and kind != "plain" else None
        return pa.table({
            "sample_id": [f"{kind[0]}{i:09d}" for i in idx], "problem_id": problem, "sample_idx": pa.array(np.asarray(idx) % samples, pa.int32()),
            "prompt": ["<|user|>q<|end|><|assistant|>"] * m, "completion": ["x" * 32] * m, "completion_token_ids": ids,
            "behaviour_logprobs": lp(), "temperature": [1.0] * m, "finish_reason": ["stop"] * m,
            "extracted_answer": ["1"] * m, "correct": (rng.random(m) < 0.2).tolist() if correct is None else [correct] * m,
            "policy_id": ["bench"] * m, "prompt_kind": [kind] * m, "guidance": pa.nulls(m, pa.string()), "loss_prompt": ["q"] * m,
            "loss_logprobs": lp(), "level": [level[p] for p in problem] if level else [levels[i // samples % n_problems] for i in idx],
            "error": pa.nulls(m, pa.string())})

    def rollouts():
        for s in range(0, n, PART_ROWS):
            idx = np.arange(s, min(n, s + PART_ROWS))
            yield conform(table(idx, [pids[i // samples % n_problems] for i in idx]), "rollouts")

    def explanations():  # one selected explanation for every 10th problem
        for s in range(0, n_problems, PART_ROWS * 10):
            chosen = list(range(s, min(n_problems, s + PART_ROWS * 10), 10))
            t = table(chosen, [pids[i] for i in chosen], "explain", True)
            m = t.num_rows
            t = t.append_column("explain_loglik", pa.array([-1.0] * m)).append_column("explain_loglik_total", pa.array([-30.0] * m))
            t = t.append_column("explain_answer_gain", pa.array([0.5] * m)).append_column("leaks_answer", pa.array([False] * m))
            yield conform(t.append_column("selected", pa.array([True] * m)), "explanations")

    def hints():  # two right hinted samples for every 10th problem (offset 5)
        for s in range(5, n_problems, PART_ROWS * 5):
            chosen = [i for i in range(s, min(n_problems, s + PART_ROWS * 5), 10) for _ in range(2)]
            yield conform(table(range(s, s + len(chosen)), [pids[i] for i in chosen], "hint", True), "rollouts")

    def grades():
        for s in range(0, n, PART_ROWS):
            m = min(PART_ROWS, n - s)
            score = rng.random(m).round(2)
            yield conform(pa.table({
                "sample_id": [f"p{i:09d}" for i in range(s, s + m)], "outcome_score": score,
                "step_scores": pa.array([[x] for x in score], pa.list_(pa.float64())), "steps": [["x" * 32]] * m,
                "judge": ["rule"] * m, "judge_raw": pa.nulls(m, pa.string()), "parse_ok": [True] * m,
                "error": pa.nulls(m, pa.string())}), "grades")

    # curate's input: a JSONL file of N problems (a template sentence + random words; 1% repeated)
    words = np.array([f"w{i}" for i in range(5000)])
    with open(ws / "source.jsonl", "w") as fh:
        for s in range(0, n, PART_ROWS):
            m = min(PART_ROWS, n - s)
            picks = words[rng.integers(0, len(words), (m, 12))]
            for i, row in enumerate(picks):
                k = s + i if rng.random() > 0.01 else max(0, s + i - 1)
                fh.write(json.dumps({"question": f"Solve the following problem carefully. {' '.join(row)} number {k}?",
                                     "answer": str(k)}) + "\n")
    _write_output(ws, "curate", "problems", "problems", problems())
    _write_output(ws, "rollouts", "rollouts", "rollouts", rollouts())
    _write_output(ws, "explain", "explanations", "explanations", explanations())
    _write_output(ws, "hint", "hints", "rollouts", hints())
    _write_output(ws, "grade", "grades", "grades", grades())
    _write_output(ws, "rubric", "rubrics", "rubrics", [conform(pa.table({"problem_id": pa.array([], pa.string()),
        "items": pa.array([], pa.list_(pa.struct([("text", pa.string()), ("weight", pa.float64())]))),
        "rubric_model": pa.array([], pa.string())}), "rubrics")])


JOBS = {
    "filter": """
from tasks.core.store import StageOutput
from tasks.core.schemas import conform
from tasks.stages import filter as f
import pyarrow.parquet as pq
# --- timed
cur, ro = StageOutput.open(WS / "store/curate/benchcurate"), StageOutput.open(WS / "store/rollouts/benchrollouts")
kept, table = f.filter_problems(cur.scan("problems"), ro.scan("rollouts"), 0.0, 0.0)
pq.write_table(conform(kept, "filtered_problems"), OUT / "kept.parquet"); pq.write_table(conform(table, "pass_rates"), OUT / "rates.parquet")
""",
    "filter:bare": """
import polars as pl
# --- timed
lf = pl.scan_parquet(str(WS / "store/rollouts/benchrollouts/rollouts/data/*.parquet")).select("problem_id", "level", "finish_reason", "correct")
lf.group_by("problem_id").agg(pl.col("level").first(), pl.len().alias("n"), pl.col("correct").sum().alias("k")).sink_parquet(OUT / "bare.parquet")
""",
    "filter:in-memory (before)": """
from tasks.core.store import StageOutput
# --- timed
ro = StageOutput.open(WS / "store/rollouts/benchrollouts")
rows = ro.read("rollouts").select(["problem_id", "level", "finish_reason", "correct"]).to_pylist()
rates = {}
for r in rows:
    e = rates.setdefault(r["problem_id"], [0, 0]); e[0] += 1; e[1] += int(r["correct"])
""",
    "curate": """
from tasks.stages.curate import ProblemsConfig, curate_parts
# --- timed
cfg = ProblemsConfig.model_validate({"sources": [{"file": str(WS / "source.jsonl")}], "eval_fraction": 0.05})
curate_parts(cfg, lambda p: WS / p, OUT / "curate")
""",
    "curate:bare": """
import polars as pl
# --- timed
# the same steps in polars: normalised key (lower case, spaces collapsed), dedup, a 5% eval split by a hash of the key,
# word 8-grams of each question, train problems with half or more of their 8-grams in the eval split's dropped
lf = pl.scan_ndjson(WS / "source.jsonl").with_columns(key=pl.col("question").str.to_lowercase().str.replace_all(r"\\s+", " ").str.strip_chars())
df = (lf.unique(subset="key", keep="first", maintain_order=True)
      .with_columns(split=pl.when(pl.col("key").hash(seed=0) % 100 < 5).then(pl.lit("eval")).otherwise(pl.lit("train")),
                    row=pl.int_range(pl.len())).collect())
grams = (df.lazy().select("row", "split", pl.col("key").str.extract_all(r"\\w+|[^\\w\\s]").alias("t"))
         .with_columns(g=pl.col("t").list.eval(pl.concat_str([pl.element().shift(-i) for i in range(8)], separator=" ")).list.drop_nulls())
         .explode("g").drop_nulls("g").select("row", "split", h=pl.col("g").hash(seed=0)))
eval_grams = grams.filter(pl.col("split") == "eval").select("h").unique().with_columns(hit=pl.lit(True))
frac = grams.filter(pl.col("split") == "train").join(eval_grams, on="h", how="left").group_by("row").agg(frac=pl.col("hit").fill_null(False).mean())
df.lazy().join(frac, on="row", how="left").filter(pl.col("frac").fill_null(0.0) < 0.5).drop("key", "row", "frac").sink_parquet(OUT / "curated.parquet")
""",
    "materialize": """
from tasks.core.stage import Job
from tasks.core.store import StageOutput, Store
from tasks.registry import REGISTRY, parse_config
# --- timed
config = parse_config({"problems": {"sources": [{"file": "x.jsonl"}]}}, base_dir=WS)
stage = REGISTRY["materialize"]
up = {s: StageOutput.open(WS / f"store/{s}/bench{s}") for s in (*stage.upstream, *stage.optional_upstream)
      if (WS / f"store/{s}/bench{s}").is_dir()}  # every guidance the bench wrote (explain, hint, grade)
stage.impl.compute(Job(stage, config, Store(WS), up, *stage.key_for(config, up)))
""",
    "materialize:bare": """
import polars as pl
# --- timed
ro = pl.scan_parquet(str(WS / "store/rollouts/benchrollouts/rollouts/data/*.parquet"))
gr = pl.scan_parquet(str(WS / "store/grade/benchgrade/grades/data/*.parquet")).select("sample_id", "outcome_score")
lf = ro.join(gr, on="sample_id", how="left").with_columns(reward=pl.col("correct").cast(pl.Float64))
std = pl.col("reward").std(ddof=0).over("problem_id")
lf = lf.with_columns(advantage=(pl.col("reward") - pl.col("reward").mean().over("problem_id")) / (std + 1e-6)).filter(std > 0)
lf.select("sample_id", "problem_id", "loss_prompt", "completion_token_ids", "reward", "advantage", "behaviour_logprobs",
          "loss_logprobs").sink_parquet(OUT / "grpo.parquet")
""",
    "grade (rule judge)": """
from tasks.core.store import StageOutput, Store
from tasks.registry import REGISTRY, parse_config
# --- timed
config = parse_config({"problems": {"sources": [{"file": "x.jsonl"}]}, "judge": {"backend": "rule"}}, base_dir=WS)
stage = REGISTRY["grade"]
up = {s: StageOutput.open(WS / f"store/{s}/bench{s}") for s in stage.upstream}
stage.run(config, Store(WS), up, force=True)  # computed again on each repeat
""",
    "grade (rule judge):bare": """
import pyarrow.dataset as ds, pyarrow.parquet as pq
from tasks.core.schemas import to_table
from tasks.models import judge
from tasks.registry import parse_config
# --- timed
jc = parse_config({"problems": {"sources": [{"file": "x.jsonl"}]}, "judge": {"backend": "rule"}}, base_dir=WS).judge
j = judge.RuleJudge(jc.mode, jc.step_split)
problems = {r["problem_id"]: r for r in ds.dataset(str(WS / "store/curate/benchcurate/problems/data")).to_table(
    columns=["problem_id", "question", "answer", "reference_solution"]).to_pylist()}
cols = ["sample_id", "problem_id", "completion", "correct"]
with pq.ParquetWriter(OUT / "grades.parquet", to_table([], "grades").schema) as w:
    for batch in ds.dataset(str(WS / "store/rollouts/benchrollouts/rollouts/data")).to_batches(columns=cols, batch_size=512):
        traces = [judge.Trace(r["sample_id"], r["problem_id"], problems[r["problem_id"]]["question"],
                              judge.reference_text(problems[r["problem_id"]]), r["completion"], r["correct"]) for r in batch.to_pylist()]
        w.write_table(to_table(j.grade(traces), "grades").select(to_table([], "grades").schema.names))
""",
    "grpo data loading": """
from tasks.core.store import StageOutput, data_files
from tasks.stages.grpo import GRPORows, minibatches, trainable_count
# --- timed
data = StageOutput.open(next(WS.glob("store/materialize/*")))  # as the grpo stage: the trainable rows from materialize's summary
rows = GRPORows(data_files(data.dataset_path("grpo")), 4096, trainable_count(data.summary["grpo"]["rows_by_kind"]))
steps, batches = minibatches(rows, 16, 1, seed=0)
seen = sum(len(b) for b in batches)  # one epoch of the update's minibatches, without the model
""",
    "grpo data loading:bare": """
import pyarrow.parquet as pq
from tasks.stages.grpo import GRPORows
# --- timed
seen = 0
for f in sorted(WS.glob("store/materialize/*/grpo/data/*.parquet")):
    for batch in pq.ParquetFile(f).iter_batches(batch_size=1024, columns=GRPORows.COLUMNS):
        rows = batch.select([c for c in GRPORows.COLUMNS if c not in GRPORows.PER_TOKEN]).to_pylist()
        for name in GRPORows.PER_TOKEN:
            column = batch.column(name)
            offsets, values = column.offsets.to_numpy(), column.values.to_numpy(zero_copy_only=False)
            for i, r in enumerate(rows):
                r[name] = values[offsets[i]:offsets[i + 1]]
        seen += len(rows)  # the update's columns read once as rows (per-token values as NumPy views), in file order, no shuffle
""",
    "datasets show": """
from tasks.core.store import head_rows, open_dataset
# --- timed
data, rows = open_dataset(WS / "store/rollouts/benchrollouts/rollouts")
head = head_rows(WS / "store/rollouts/benchrollouts/rollouts", 5)  # as `datasets show`
""",
    "datasets show:bare": """
import hashlib, pyarrow.parquet as pq
# --- timed
for f in sorted((WS / "store/rollouts/benchrollouts/rollouts/data").glob("*.parquet")):
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    pq.ParquetFile(f).metadata
""",
    "datasets diff": """
from tasks.core.share import describe
# --- timed
describe(WS / "store/rollouts/benchrollouts/rollouts")
""",
    "datasets diff:bare": """
import polars as pl
# --- timed
lf = pl.scan_parquet(str(WS / "store/rollouts/benchrollouts/rollouts/data/*.parquet"))
schema = lf.collect_schema()
exprs = [pl.len()] + [pl.col(c).null_count().alias(c + ":nulls") for c in schema]
for c, t in schema.items():
    if t.is_numeric():
        exprs += [pl.col(c).mean().alias(c + ":mean"), pl.col(c).min().alias(c + ":min"), pl.col(c).max().alias(c + ":max")]
    elif t == pl.Boolean:
        exprs.append(pl.col(c).sum().alias(c + ":true"))
    elif t == pl.String:
        exprs.append(pl.col(c).n_unique().alias(c + ":distinct"))
    elif isinstance(t, pl.List):
        exprs.append(pl.col(c).list.len().mean().alias(c + ":len"))
lf.select(exprs).collect()  # the same statistics in one plain query (polars' default engine)
""",
}


STEPS = ("curate", "filter", "materialize", "grpo data loading", "grade (rule judge)", "datasets show", "datasets diff")


def measure(code: str, ws: Path, out: Path) -> dict:
    """Run ``code`` in a fresh interpreter: its imports (the part before ``# --- timed``) first,
    then the clock on the rest; its seconds and peak RSS."""
    setup, _, timed = code.partition("# --- timed")
    wrapper = f"""
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, {str(ROOT)!r})
WS, OUT = Path({str(ws)!r}), Path({str(out)!r})
import polars, pyarrow, pyarrow.dataset, pyarrow.parquet  # imported before the clock and the baseline RSS, as in a running stage
{setup}
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
{timed}
print(json.dumps({{"seconds": time.perf_counter() - t0, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "import_mb": base / 1024}}))
"""
    proc = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, env={**os.environ, "POLARS_MAX_THREADS": "2"})
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="16384,131072", help="trace counts, comma-separated")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=16, help="samples per problem")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each step and its bare pass, alternated; the fastest of each is reported")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"steps to measure, comma-separated (default all: {', '.join(STEPS)})")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / f"scale-{dt.date.today().isoformat()}.md"))
    ap.add_argument("--generate-into", help=argparse.SUPPRESS)  # the child that writes the synthetic outputs
    args = ap.parse_args()
    if args.generate_into:
        generate(Path(args.generate_into), int(args.n), args.tokens, args.samples)
        return

    lines = [f"# bench/scale.py — {dt.datetime.now().isoformat(timespec='seconds')}", "",
             f"`python bench/scale.py --n {args.n} --tokens {args.tokens} --samples {args.samples} --repeat {args.repeat}"
             + (f" --steps '{args.steps}'" if args.steps != ",".join(STEPS) else "") + "` on "
             f"{os.cpu_count()} CPU cores; peak RSS of a fresh child process (imports done before the clock); each step and its bare "
             "pass run alternately, the fastest run of each reported; ratio = ours / bare pass in the same run.", "",
             "| N traces | rollouts on disk | step | seconds | peak RSS MB | bare seconds | bare peak MB | time ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for n in [int(x) for x in args.n.split(",")]:
        ws = Path(tempfile.mkdtemp(prefix=f"guidedrl-scale-{n}-"))
        try:
            t0 = time.perf_counter()
            # in a child process: Linux keeps a parent's peak RSS as the floor of its children's ru_maxrss
            subprocess.run([sys.executable, __file__, "--generate-into", str(ws), "--n", str(n), "--tokens", str(args.tokens),
                            "--samples", str(args.samples)], check=True)
            size = sum(f.stat().st_size for f in (ws / "store" / "rollouts").rglob("*.parquet")) / 2**20
            print(f"N={n}: generated {size:.0f} MB of rollouts in {time.perf_counter() - t0:.0f}s", flush=True)
            for step in [x for x in args.steps.split(",") if x]:
                out = ws / "out"
                out.mkdir(exist_ok=True)
                runs = [(measure(JOBS[step], ws, out), measure(JOBS[f"{step}:bare"], ws, out)) for _ in range(args.repeat)]
                ours = min((r[0] for r in runs), key=lambda m: m["seconds"])
                bare = min((r[1] for r in runs), key=lambda m: m["seconds"])
                row = (f"| {n:,} | {size:,.0f} MB | {step} | {ours['seconds']:.2f} | {ours['peak_mb']:.0f} | {bare['seconds']:.2f} | "
                       f"{bare['peak_mb']:.0f} | {ours['seconds'] / bare['seconds']:.2f} |")
                print(row, flush=True)
                lines.append(row)
            if "filter" not in args.steps.split(","):
                continue
            before = measure(JOBS["filter:in-memory (before)"], ws, ws)
            row = f"| {n:,} | {size:,.0f} MB | filter, in memory (as before) | {before['seconds']:.2f} | {before['peak_mb']:.0f} | | | |"
            print(row, flush=True)
            lines.append(row)
        finally:
            shutil.rmtree(ws, ignore_errors=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
