"""How a tiny chain-sum policy fails, checkpoint by checkpoint: why a level's pass@1 moves.

    python bench/failure_modes.py --rows bench/results/STUDY.json --methods grpo,expo --round 3 [--level easy]
    python bench/failure_modes.py --checkpoint A --checkpoint B [--level easy]

For each checkpoint (a learning-study run's, named by method, seed and round in its rows' ``checkpoint``; or given
directly), samples chain sums of the family's level (reasoning-gym, the policy's own prompt, temperature 1) and sorts
every sample into one failure mode, by the number of terms of its problem:

- ``right``: the boxed answer is right;
- ``too_many_steps`` / ``too_few_steps``: the partial-sum lines are more / fewer than the problem's terms − 1
  (a policy taught to write five partial sums writes them on a three-term chain too);
- ``wrong_term``: a step's right-hand operand is not the problem's next term (copied wrongly);
- ``arithmetic``: a step's sum is wrong;
- ``answer``: the steps are right but the boxed answer is not the last sum; ``other``: no steps to read.

Prints a table per checkpoint (share of each mode, by terms) and, with several, the mean per method: what a study's
easy-level drop is made of. A diagnostic, not a benchmark: no ratio is asked of it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("right", "too_many_steps", "too_few_steps", "wrong_term", "arithmetic", "answer", "other")
_STEP = re.compile(r"^(-?\d+) ([+-]) (-?\d+) = (-?\d+)$")


def classify(question: str, completion: str, answer: str) -> str:
    """The failure mode of one sample of a chain sum (``question`` ends with ``a op b op ... =``)."""
    from tasks.models.answers import last_boxed

    expr = question.rsplit(":", 1)[-1].strip().rstrip("=").split()
    terms, ops = [int(t) for t in expr[0::2]], expr[1::2]
    boxed = last_boxed(completion)
    if boxed is not None and boxed.strip() == str(answer).strip():
        return "right"
    steps = [m.groups() for m in (_STEP.match(line.strip()) for line in completion.splitlines()) if m]
    if not steps:
        return "other"
    if len(steps) > len(terms) - 1:
        return "too_many_steps"
    if len(steps) < len(terms) - 1:
        return "too_few_steps"
    for (a, op, b, c), want_op, want_b in zip(steps, ops, terms[1:]):
        if op != want_op or int(b) != want_b:
            return "wrong_term"
        if int(a) + (int(b) if op == "+" else -int(b)) != int(c):
            return "arithmetic"
    return "answer"


def problems(family: str, level: str, n: int, seed: int) -> list[dict]:
    """``n`` chain sums of the family's level (its own reasoning-gym settings), drawn with ``seed``."""
    import reasoning_gym

    from tasks.models.tiny_policy import FAMILIES, TinyPolicyConfig

    conf = getattr(TinyPolicyConfig(**FAMILIES[family]), level)
    data = reasoning_gym.create_dataset("chain_sum", size=n, seed=seed, **conf)
    return [{"question": e["question"], "answer": str(e["answer"])} for e in data]


def modes_of(checkpoint: str, items: list[dict], samples: int, max_new_tokens: int, seed: int) -> dict[int, Counter]:
    """terms -> Counter of failure modes over ``samples`` samples of each problem."""
    from tasks.models.generation import SamplingParams
    from tasks.models.prompts import chat, fill, load_template
    from tasks.models.transformers_backend import TransformersBackend

    backend = TransformersBackend(checkpoint)
    template = load_template("tiny_plain")
    prompts = [chat(backend.tokenizer, fill(template, it["question"])) for it in items]
    out = backend.generate(prompts, SamplingParams(n=samples, temperature=1.0, max_new_tokens=max_new_tokens, seed=seed))
    by_terms: dict[int, Counter] = defaultdict(Counter)
    for it, group in zip(items, out):
        terms = (len(it["question"].rsplit(":", 1)[-1].strip().rstrip("=").split()) + 1) // 2
        for s in group:
            by_terms[terms][classify(it["question"], s.text, it["answer"])] += 1
    return by_terms


def table(name: str, by_terms: dict[int, Counter]) -> str:
    lines = [f"{name}", "", f"| terms | samples | {' | '.join(MODES)} |", f"| {' | '.join(['---'] * (len(MODES) + 2))} |"]
    total: Counter = Counter()
    for t in sorted(by_terms):
        c = by_terms[t]
        total.update(c)
        n = sum(c.values())
        lines.append(f"| {t} | {n} | " + " | ".join(f"{c[m] / n:.3f}" for m in MODES) + " |")
    n = sum(total.values())
    lines.append(f"| all | {n} | " + " | ".join(f"{total[m] / n:.3f}" for m in MODES) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=Path, help="a learning study's rows (.json) with checkpoint paths (run with --workspace)")
    ap.add_argument("--methods", default=None, help="comma-separated methods of --rows (default: all)")
    ap.add_argument("--round", type=int, default=None, help="the round of --rows (default: the last)")
    ap.add_argument("--checkpoint", action="append", default=[], help="a checkpoint directory (repeatable)")
    ap.add_argument("--start", action="store_true", help="also the family's bootstrap policy (round 0)")
    ap.add_argument("--family", default="chain6")
    ap.add_argument("--level", default="easy", choices=("easy", "hard"))
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the family's")
    ap.add_argument("--seed", type=int, default=31337, help="the problems' draw and the sampling")
    args = ap.parse_args()
    from tasks.models.tiny_policy import FAMILIES, TinyPolicyConfig

    fam = TinyPolicyConfig(**FAMILIES[args.family])
    named: list[tuple[str, str]] = [(c, c) for c in args.checkpoint]
    if args.rows:
        rows = [r for r in json.loads(args.rows.read_text()) if r.get("checkpoint") and r.get("phase", "final") == "final"]
        last = args.round or max(r["round"] for r in rows)
        wanted = set(args.methods.split(",")) if args.methods else None
        named += [(f"{r['method']} seed {r['seed']} round {r['round']}", r["checkpoint"]) for r in rows
                  if r["round"] == last and (wanted is None or r["method"] in wanted)]
    if args.start:
        named.insert(0, ("start (round 0)", str(ROOT / "data" / "models" / f"tiny-{args.family}")))
    if not named:
        ap.error("nothing to measure: give --rows (of a study run with --workspace) or --checkpoint")
    items = problems(args.family, args.level, args.problems, args.seed)
    per_method: dict[str, Counter] = defaultdict(Counter)
    for name, ckpt in named:
        by_terms = modes_of(ckpt, items, args.samples, args.max_new_tokens or fam.max_new_tokens, args.seed)
        print(table(f"{name} ({args.level} level)", by_terms), "\n", flush=True)
        for t, c in by_terms.items():
            per_method[name.split(" seed ")[0]].update({(t, m): v for m, v in c.items()})
    if len(per_method) < len(named):  # several seeds of a method: their samples together
        for method, c in per_method.items():
            by_terms = defaultdict(Counter)
            for (t, m), v in c.items():
                by_terms[t][m] += v
            print(table(f"{method}, every seed ({args.level} level)", by_terms), "\n")


if __name__ == "__main__":
    main()
