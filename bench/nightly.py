"""Benchmark: what a night costs when the problem set grows and the policy changes now and then.

    python bench/nightly.py [--problems 300] [--growth 0.02] [--samples 8]

One workspace kept between nights, as the nightly-data deployment keeps its store. The sampling
stages (`rollouts`, then `filter`, `explain` on every rolled-out problem, `hint` on the stuck
ones) run on the tiny policy with the quickstart's prompts:

- night 1: `--problems` chain sums, everything sampled (the baseline);
- night 2: the same problems plus `--growth` new ones (appended to the same file), the same policy;
- night 3: night 2's problems, a new policy (data/models/tiny-chain6): nothing can be reused.

Prints per night: the seconds of the sampling stages and the policy calls (samples the backend
was asked for, counted at the backend), both against night 1; the problems each stage reused
and sampled; and night 2's policy calls over its new share of the work (goal: <= 1.2 × the new
share, i.e. night 2 costs at most 1.2 × growth of night 1 in policy calls, plus fixed start-up:
the model load, reading the store's reuse indexes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ("rollouts", "explain", "hint")


def problems(n: int) -> list[dict]:
    """``n`` reasoning-gym chain sums (easy: 1-digit terms; hard: 2-digit, where the tiny policy is stuck)."""
    import reasoning_gym

    easy = reasoning_gym.create_dataset("chain_sum", size=n, seed=5, min_terms=2, max_terms=3, min_digits=1, max_digits=1)
    hard = reasoning_gym.create_dataset("chain_sum", size=n, seed=6, min_terms=2, max_terms=2, min_digits=2, max_digits=2)
    out = []
    for i in range(n):
        entry, level = (hard[i], "hard") if i % 3 == 0 else (easy[i], "easy")
        out.append({"question": entry["metadata"]["expression"] + " =", "answer": str(entry["answer"]), "level": level})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=300)
    ap.add_argument("--growth", type=float, default=0.02)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()
    os.environ.setdefault("GUIDEDRL_PROGRESS", "0")

    from tasks.core.store import Store
    from tasks.models.transformers_backend import TransformersBackend
    from tasks.registry import REGISTRY, parse_config

    asked = [0]
    real = TransformersBackend.generate

    def counting(self, prompts, params, seeds=None):
        asked[0] += len(prompts) * params.n
        return real(self, prompts, params, seeds)

    TransformersBackend.generate = counting
    grown = problems(args.problems + max(1, round(args.problems * args.growth)))

    with tempfile.TemporaryDirectory(prefix="guidedrl-nightly-") as tmp:
        tmp = Path(tmp)
        source = tmp / "problems.jsonl"

        def night(n_problems: int, model: Path) -> dict:
            source.write_text("".join(json.dumps(p) + "\n" for p in grown[:n_problems]))
            config = parse_config({
                "problems": {"sources": [{"file": str(source)}], "eval_fraction": 0.0},
                "policy": {"model": str(model), "batch_size": 64},
                "prompts": {"plain": "tiny_plain", "explain": "tiny_explain", "hint": "tiny_hint"},
                "rollouts": {"samples_per_problem": args.samples, "max_new_tokens": args.max_new_tokens},
                "explain": {"problems": "all", "samples_per_problem": 2},
            }, base_dir=ROOT)
            store = Store(tmp / "ws")
            outs = {"curate": REGISTRY["curate"].run(config, store)[0]}
            seconds, calls = {}, {}
            for stage in ("rollouts", "filter", "explain", "hint"):
                before, t0 = asked[0], time.perf_counter()
                up = {k: outs[k] for k in REGISTRY[stage].upstream}
                outs[stage] = REGISTRY[stage].run(config, store, up)[0]
                seconds[stage], calls[stage] = time.perf_counter() - t0, asked[0] - before
            return {"problems": n_problems, "seconds": sum(seconds[s] for s in STAGES), "calls": sum(calls.values()),
                    "stages": {s: (outs[s].summary.get("sampled_problems"), outs[s].summary.get("reused_problems"), round(seconds[s], 2),
                                   calls[s]) for s in STAGES}}

        tiny, other = ROOT / "data" / "models" / "tiny-policy", ROOT / "data" / "models" / "tiny-chain6"
        n1, n2 = args.problems, len(grown)
        nights = [("1: full", night(n1, tiny)), (f"2: +{n2 - n1} problems, same policy", night(n2, tiny)),
                  ("3: new policy", night(n2, other))]

    base = nights[0][1]
    rolled = [sum(r["stages"]["rollouts"][:2]) for _, r in nights]  # problems after curation (duplicates dropped)
    n1, n2 = rolled[0], rolled[1]
    share = (n2 - n1) / n1  # the new work, as a share of night 1's
    print(f"\nnightly reuse, {n1} -> {n2} problems (growth {share:.2%}), G = {args.samples}, the tiny policy on {os.cpu_count()} CPUs\n")
    print("| night | sampling s | vs night 1 | policy calls (samples) | vs night 1 | rollouts sampled/reused | explain | hint |")
    print("| --- | ---: | ---: | ---: | ---: | --- | --- | --- |")
    for name, r in nights:
        cells = [f"{r['stages'][s][0]}/{r['stages'][s][1]}" for s in STAGES]
        print(f"| {name} | {r['seconds']:.1f} | {r['seconds'] / base['seconds']:.3f} | {r['calls']} | {r['calls'] / base['calls']:.4f} | "
              + " | ".join(cells) + " |")
    second = nights[1][1]
    ratio = (second["calls"] / base["calls"]) / share
    print(f"\nnight 2: policy calls {second['calls'] / base['calls']:.4f} of night 1's = {ratio:.2f} x the growth "
          f"(goal <= 1.2: {'met' if ratio <= 1.2 else 'NOT met'}); time {second['seconds'] / base['seconds']:.3f} of night 1's "
          f"(fixed start-up: model loads, store lookups)")


if __name__ == "__main__":
    main()
