"""Benchmark: what fanning a stage's shards out as Prefect tasks costs over running
them one after another in the stage's process, in one run.

    python bench/fanout.py [--problems 240] [--repeats 4]

On the quickstart's problems and rollouts (the tiny policy, 8 samples per
problem), two stages: `explain` (generation: 8 explanations for each stuck
problem, shards of 32 problems, as in the quickstart) and `grade` with the rule
judge (almost no work per trace, shards of 64 traces: Prefect's cost laid bare).
Baseline: `Stage.run` (shard after shard, no Prefect). Fan-out:
`flows.stages.run_sharded_stage` inside a Prefect flow on the thread runner
with one worker, so the difference is Prefect's per-task bookkeeping, not
parallelism. Both recompute the output (force); best of `--repeats`. Prints
seconds of each, the ratio baseline/fan-out (goal for a stage with real work
per shard, `explain`: >= 0.95) and the overhead per shard task. The temporary
Prefect server starts before anything is timed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=240)
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    for k, v in {"GUIDEDRL_PROGRESS": "0", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}.items():
        os.environ.setdefault(k, v)

    from prefect import flow

    from flows.stages import load_upstream, run_sharded_stage
    from tasks.core.config import read_yaml
    from tasks.core.stage import Job
    from tasks.core.store import Store
    from tasks.registry import REGISTRY, parse_config
    from tasks.stages import curate, rollouts, rubric
    from tasks.stages import filter as filter_stage

    raw = read_yaml(ROOT / "configs" / "quickstart.yaml")
    raw["rollouts"]["max_problems"] = args.problems
    raw["judge"]["shard_size"] = 64
    raw["prefect"] = {"retries": 0}
    config = parse_config(raw, where="quickstart config", base_dir=ROOT)

    with tempfile.TemporaryDirectory() as ws:
        store = Store(ws)
        cur, _ = curate.STAGE.run(config, store)
        roll, _ = rollouts.STAGE.run(config, store, {"curate": cur})
        rub, _ = rubric.STAGE.run(config, store, {"curate": cur, "rollouts": roll})
        fil, _ = filter_stage.STAGE.run(config, store, {"curate": cur, "rollouts": roll})
        upstream = {"curate": cur, "rollouts": roll, "rubric": rub, "filter": fil}
        paths = {s: str(o.path) for s, o in upstream.items()}

        @flow(name="bench-fanout")
        def timed(stage: str, repeats: int) -> tuple[float, float, int]:
            stage_def, seq, fan = REGISTRY[stage], [], []

            def sequential():
                stage_def.run(config, store, {u: load_upstream(paths)[u] for u in stage_def.upstream}, force=True)

            def fanned_out():
                run_sharded_stage(stage, config, raw, str(ROOT), ws, {u: paths[u] for u in stage_def.upstream}, force=True)

            for r in range(repeats):  # alternate which goes first: this machine's speed drifts
                for fn, times in ([(sequential, seq), (fanned_out, fan)] if r % 2 == 0 else [(fanned_out, fan), (sequential, seq)]):
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
            up = {u: load_upstream(paths)[u] for u in stage_def.upstream}
            shards = len(stage_def.impl.plan(Job(stage_def, config, store, up, *stage_def.key_for(config, up))).shards)
            return min(seq), min(fan), shards

        results = {stage: timed(stage, args.repeats) for stage in ("explain", "grade")}
    print(f"{roll.summary['samples']} rollouts of {roll.summary['problems']} problems; {roll.summary['all_fail_problems']} stuck")
    print(f"{'stage':8} {'shards':>6} {'shard after shard':>18} {'shard tasks':>12} {'ratio':>6} {'overhead/task':>14}")
    for stage, (base, ours, shards) in results.items():
        print(f"{stage:8} {shards:6d} {base:17.2f}s {ours:11.2f}s {base / ours:6.3f} {1000 * (ours - base) / shards:12.0f}ms")


if __name__ == "__main__":
    main()
