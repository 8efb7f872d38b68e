"""The learning study: does guidance teach the tiny policy its stuck level, beyond the seed spread?

    python bench/learning.py [--family chain6] [--seeds 0,1,2] [--rounds 3] [--methods grpo,expo,lte,exprl] [--out PREFIX]
    python bench/learning.py --small          # the version the test suite runs

For each seed (seeded problem draws and sampling) and each method, from the same
tiny policy, runs online rounds — rollouts → filter → explain, hint → grade →
materialize → grpo → eval: the stages of `guidedrl online` (the registry's round
stages and `flows.online.round_config`), called in-process without Prefect:

- `grpo`   plain GRPO: verified rewards, no guidance used;
- `expo`   ExPO-GRPO: the selected self-explanations in the update (β-NLL term under the original prompt);
- `lte`    LTE: failed samples of all-failed groups replaced by correct hinted ones (shaped ratio);
- `exprl`  ExpRL process mode: rollouts rewarded by the rule judge's step scores (token advantages);
- `prefix` reference prefix (QuestA's schedule, 50 % then 25 % of the reference's steps): continuations of the
           stuck problems trained under the prompt they were shown, a group of their own;
- `self-hint` the policy writes a hint from the answer (the tiny policy: the first line of its explanation,
           kept when it does not state the answer), its hinted samples trained under the hinted prompt.

Equal policy-sample budget: plain GRPO and ExpRL (whose extra cost is the judge,
not the policy) sample 2G rollouts per problem; ExPO, LTE, prefix and self-hint
sample G and spend the rest on their guidance samples (at most G per stuck
problem; self-hint also writes its hints, counted). The table says
what each spent.

After each round: pass@1 and pass@k of the stuck (hard) level's eval problems
(also pass@k counting only right answers whose derivation states every partial
result of the reference: `eval.check_derivation`, so lucky guesses do not count),
the easy level's pass@1, and the run's frontier (tasks/report/frontier.py): the
stuck set of the training problems and how many of them each guidance reached
with a verified sample (right explanations; right hinted samples; wrong rollouts
with the judge's partial credit). With several seeds it prints mean and min–max
per method and round, writes the table (Markdown), the rows (JSON) and a chart
of stuck-level pass@k by round per method (PNG) to --out, and the total time.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = {
    "grpo": {"materialize": {"include_explanations": False, "lte_replace": False, "reward": "verify"}},
    "expo": {"materialize": {"include_explanations": True, "lte_replace": False, "reward": "verify"}},
    "lte": {"materialize": {"include_explanations": False, "lte_replace": True, "reward": "verify"}},
    "exprl": {"materialize": {"include_explanations": False, "lte_replace": False, "reward": "judge"}},
    "prefix": {"materialize": {"include_explanations": False, "lte_replace": False, "reward": "verify", "include_prefixed": True}},
    "self-hint": {"materialize": {"include_explanations": False, "lte_replace": False, "reward": "verify", "include_self_hints": True}},
}
#: each method at its paper's own settings (--paper): the loss terms the papers fix, with the values of the
#: presets in configs/presets/ (where their sources are); sample counts, temperatures and rounds stay the
#: study's, so every method spends the same policy-sample budget
PAPER = {
    "grpo": {"train": {"grpo": {"clip_low": 0.2, "clip_high": 0.28, "kl": 0.0, "loss_agg": "token-mean"}}},
    "expo": {"train": {"grpo": {"expo_beta": 0.04, "expo_nll": "sequence", "expo_beta_schedule": "constant"}}},
    "lte": {"train": {"grpo": {"gamma": 0.1, "loss_agg": "token-mean"}}},
    "exprl": {"judge": {"mode": "process", "process_protocol": "segment", "overlong": "zero"},
              "train": {"grpo": {"clip_low": 0.2, "clip_high": 0.26, "kl": 0.001, "kl_reference": "initial", "entropy": 0.0,
                                 "loss_agg": "token-mean"}}},
    "prefix": {"prefix": {"fractions": [0.5, 0.25], "form": "prompt", "loss": "guided"},
               "train": {"grpo": {"clip_low": 0.2, "clip_high": 0.28, "kl": 0.0, "loss_agg": "token-mean"}}},
    "self-hint": {"self_hint": {"write_from": "answer", "write_samples": 4, "loss": "guided"},
                  "train": {"grpo": {"clip_low": 0.2, "clip_high": 0.28, "kl": 0.0, "loss_agg": "token-mean"}}},
}
#: the methods whose guidance costs policy samples, and the stage that samples them
GUIDANCE_SAMPLES = {"expo": ("explain",), "lte": ("hint",), "prefix": ("prefix",), "self-hint": ("self_hint",)}
#: the summary counts of a guidance stage's policy samples (a self-hint's written hints are samples too)
SAMPLED = ("sampled", "hints_written")
#: the methods whose guidance costs no policy samples: they get the 2G rollouts
DOUBLE_ROLLOUTS = ("grpo", "exprl")  # (the others sample G and spend the rest on guidance)
#: --variant NAME=BASE:key.path=value;...: a method run as BASE with `--set`-style overrides (e.g. an ExPO setting), named NAME
VARIANTS: dict[str, tuple[str, list[str]]] = {}


def base_of(method: str) -> str:
    """The method a variant runs (a method is its own base; a variant of merged rows, not declared here, is known by
    its name: BASE-something)."""
    if method in VARIANTS:
        return VARIANTS[method][0]
    return method if method in METHODS else max((m for m in METHODS if method.startswith(m + "-")), key=len, default=method)


def parse_variant(text: str) -> tuple[str, str, list[str]]:
    """``NAME=BASE:a.b=v;c.d=w`` -> (NAME, BASE, the ``key=value`` overrides, applied as `--set` applies them:
    tasks.core.config.apply_overrides)."""
    name, _, rest = text.partition("=")
    base, _, sets = rest.partition(":")
    if not name or base not in METHODS:
        raise ValueError(f"--variant {text!r}: write NAME=BASE:key.path=value;... with BASE one of {', '.join(METHODS)}")
    return name, base, [item for item in sets.split(";") if item]


MODELS = {"chain2": ROOT / "data" / "models" / "tiny-policy", "chain6": ROOT / "data" / "models" / "tiny-chain6"}


def base_config(train_per_level: int, eval_per_level: int, samples: int, eval_samples: int, seed: int,
                lr: float = 5e-5, expo_beta: float = 1.0, epochs: int = 1, family: str = "chain2", easy_eval: int | None = None,
                model: Path | None = None) -> dict:
    """The run config of one seed. Both levels are split with the same eval fraction (eval_per_level of
    train_per_level + eval_per_level problems); ``easy_eval`` draws fewer easy problems (the easy level is
    watched for damage, the hard one measured)."""
    from tasks.models.tiny_policy import FAMILIES, TinyPolicyConfig

    fam = TinyPolicyConfig(**FAMILIES[family])
    fraction = eval_per_level / (train_per_level + eval_per_level)
    sizes = {"easy": math.ceil((easy_eval or eval_per_level) / fraction), "hard": train_per_level + eval_per_level}
    levels = {"easy": fam.easy, "hard": fam.hard}
    return {
        "problems": {"sources": [{"reasoning_gym": {"task": "chain_sum", "size": sizes[lvl], "seed": 900 + seed * 10 + i, "level": lvl,
                                                    "config": dict(c)}}
                                 for i, (lvl, c) in enumerate(levels.items())],
                     "eval_fraction": fraction, "split_seed": seed},
        "policy": {"model": str(model or MODELS[family]), "batch_size": 256},
        "prompts": {"plain": "tiny_plain", "explain": "tiny_explain", "hint": "tiny_hint", "prefix": "tiny_hint", "self_hint": "tiny_hint",
                    "self_hint_write": "tiny_explain"},
        "rollouts": {"samples_per_problem": samples, "max_new_tokens": fam.max_new_tokens, "seed": seed, "shard_size": 256},
        "explain": {"samples_per_problem": samples, "seed": seed},
        "hint": {"seed": seed},
        "prefix": {"seed": seed},
        # the tiny policy writes no prose: its hint is the first line of its own explanation of the answer
        "self_hint": {"seed": seed, "hint_lines": 1},
        "judge": {"backend": "rule", "mode": "process"},
        "train": {"grpo": {"learning_rate": lr, "batch_size": 16, "epochs": epochs, "expo_beta": expo_beta, "gamma": 0.1, "seed": seed}},
        # with the derivation checked: a right answer by a wrong path (a lucky guess) does not count there
        "eval": {"samples_per_problem": eval_samples, "seed": 4242 + seed, "check_derivation": True},
    }


def method_config(raw: dict, method: str, samples: int, paper: bool = False, lr: float | None = None) -> dict:
    """``raw`` for ``method``: its training signal, with ``paper`` its paper's loss settings (PAPER), with ``lr`` its rate."""
    from tasks.core.config import apply_overrides, deep_merge

    base = base_of(method)
    raw = deep_merge(raw, METHODS[base])
    if paper:
        raw = deep_merge(raw, PAPER[base])
    if method in VARIANTS:
        raw = apply_overrides(raw, VARIANTS[method][1])
    if lr is not None:
        raw["train"]["grpo"]["learning_rate"] = lr
    if base in DOUBLE_ROLLOUTS:  # the same budget: the guidance samples the others spend become rollouts
        raw["rollouts"]["samples_per_problem"] = 2 * samples
    return raw


def run_method(method: str, raw: dict, rounds: int, workspace: Path, seed: int = 0) -> list[dict]:
    from flows.online import round_config
    from tasks.core.store import Store
    from tasks.registry import REGISTRY, parse_config, round_stages, select_stages, upstream_of
    from tasks.report.frontier import build_frontier, by_round

    store = Store(workspace)
    policy, rows, spent, paths = None, [], 0, {}
    for r in range(1, rounds + 1):
        config = parse_config(round_config(raw, policy, r), where=f"{method} round {r}", base_dir=ROOT)
        outs = {}
        t0 = time.time()
        stages = select_stages(round_stages(), config=config, only_used=True)  # the online round (with curate): what it uses
        for stage in stages:
            outs[stage], _ = REGISTRY[stage].run(config, store, upstream_of(stage, outs, config, stages))
        paths[r] = {s: o.path for s, o in outs.items()}
        spent += outs["rollouts"].summary["samples"]
        for stage_name in GUIDANCE_SAMPLES.get(base_of(method), ()):
            if stage_name in outs:
                spent += sum(outs[stage_name].summary.get(k, 0) for k in SAMPLED)
        passes = outs["eval"].summary["pass"]
        derived = outs["eval"].summary.get("pass_with_derivation", {})
        if r == 1:
            rows.append({"method": method, "seed": seed, "round": 0, "samples": 0, "pass": passes["base"],
                         "pass_with_derivation": derived.get("base"), "update": {}})
        g, m = outs["grpo"].summary, outs["materialize"].summary["grpo"]
        rows.append({"method": method, "seed": seed, "round": r, "samples": spent, "pass": passes["grpo"],
                     "pass_with_derivation": derived.get("grpo"),
                     # the stuck (all-fail) groups of the round, and those the process grades give a token advantage
                     "all_fail_groups": m.get("all_fail_groups"), "all_fail_groups_with_token_advantages": m.get("all_fail_groups_with_token_advantages"),
                     "seconds": round(time.time() - t0, 1), "update": {"steps": g.get("steps"), **g.get("rows_by_kind", {})},
                     # (a path under --workspace: bench/failure_modes.py --rows reads the checkpoints)
                     "checkpoint": str(outs["grpo"].path / "checkpoint")})
        policy = str(outs["grpo"].path / "checkpoint")
        print(f"  {method} seed {seed} round {r}: {rows[-1]['seconds']}s, update {rows[-1]['update']}", flush=True)
    front = build_frontier(store, f"{method}-seed{seed}", paths)[0]
    for row, fr in zip(rows[1:], by_round(front.read("frontier"))):  # the stuck set each round started from
        row["frontier"] = fr
    return rows


def table(rows: list[dict], k: int) -> str:
    """One line per method, seed and round."""
    head = (f"| method | seed | round | policy samples | hard pass@1 | hard pass@{k} | hard pass@{k}, derivation right | easy pass@1 | "
            f"easy pass@{k} | stuck (train) | update rows (plain/guided/explain) | all-fail groups with token advantages | lr |\n"
            f"| {' | '.join(['---'] * 13)} |")
    lines = [head]
    for r in rows:
        h, e, u = r["pass"].get("hard", {}), r["pass"].get("easy", {}), r["update"]
        hd = (r.get("pass_with_derivation") or {}).get("hard", {})
        upd = f"{u.get('plain', 0)}/{u.get('guided', 0)}/{u.get('explain', 0)}" if u else "(start)"
        stuck = r.get("frontier", {}).get("stuck", "")
        signal = f"{r['all_fail_groups_with_token_advantages']} of {r['all_fail_groups']}" if r.get("all_fail_groups") is not None else ""
        lines.append(f"| {r['method']} | {r.get('seed', 0)} | {r['round']} | {r['samples']} | {h.get('pass@1', 0):.3f} | "
                     f"{h.get(f'pass@{k}', 0):.3f} | {hd.get(f'pass@{k}', 0):.3f} | {e.get('pass@1', 0):.3f} | {e.get(f'pass@{k}', 0):.3f} | {stuck} | "
                     f"{upd} | {signal} | {r.get('lr', '')} |")
    return "\n".join(lines)


def _spread(values: list[float]) -> str:
    return f"{sum(values) / len(values):.3f} [{min(values):.3f}–{max(values):.3f}]"


def aggregate(rows: list[dict], k: int) -> tuple[str, dict]:
    """Mean [min–max] over seeds per method and round: hard pass@1, hard pass@k (answers; and answers whose
    derivation states every checkpoint of the reference), easy pass@1, the stuck set, and the share of
    stuck problems each method's guidance reached with a verified sample."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    rounds = sorted({r["round"] for r in rows})
    out = {}
    lines = [f"| method | round | seeds | policy samples | hard pass@1 | hard pass@{k} | hard pass@{k}, derivation right | easy pass@1 | "
             "stuck (train) | stuck reached by guidance | lr |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    what = {"expo": "explain", "lte": "hint", "exprl": "judge", "prefix": "prefix", "self-hint": "self_hint"}
    for m in methods:
        for rd in rounds:
            sel = [r for r in rows if r["method"] == m and r["round"] == rd]
            if not sel:
                continue
            hard1 = [r["pass"].get("hard", {}).get("pass@1", 0.0) for r in sel]
            hardk = [r["pass"].get("hard", {}).get(f"pass@{k}", 0.0) for r in sel]
            hardd = [(r.get("pass_with_derivation") or {}).get("hard", {}).get(f"pass@{k}", 0.0) for r in sel]
            easy1 = [r["pass"].get("easy", {}).get("pass@1", 0.0) for r in sel]
            fr = [r["frontier"] for r in sel if r.get("frontier")]
            stuck = _spread([f["stuck"] for f in fr]) if fr else ""
            g = what.get(base_of(m))
            reached = (_spread([f[g] / f["stuck"] if f["stuck"] else 0.0 for f in fr]) if fr and g and fr[0].get(g) is not None else "")
            out[(m, rd)] = {"hard_pass_at_1": hard1, "hard_pass_at_k": hardk, "hard_derivation_pass_at_k": hardd, "easy_pass_at_1": easy1}
            lines.append(f"| {m} | {rd} | {len(sel)} | {sum(r['samples'] for r in sel) // len(sel)} | {_spread(hard1)} | {_spread(hardk)} | "
                         f"{_spread(hardd)} | {_spread(easy1)} | {stuck} | {reached} | {', '.join(f'{x:g}' for x in dict.fromkeys(r['lr'] for r in sel if 'lr' in r))} |")
    return "\n".join(lines), out


def chart(agg: dict, k: int, path: Path, title: str) -> None:
    """By round per method: stuck-level pass@k by answer, by answer and derivation, and the easy level's pass@1
    beside them (what the stuck gain costs): mean line, min–max band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    panels = ((axes[0], "hard_pass_at_k", "stuck level: right answer", f"hard (stuck) level pass@{k}, eval split"),
              (axes[1], "hard_derivation_pass_at_k", "stuck level: right answer and derivation", f"hard (stuck) level pass@{k}, eval split"),
              (axes[2], "easy_pass_at_1", "easy level: what it costs", "easy level pass@1, eval split"))
    for ax, key, what, ylabel in panels:
        for m in dict.fromkeys(m for m, _ in agg):
            pts = sorted((rd, v[key]) for (mm, rd), v in agg.items() if mm == m)
            xs = [p[0] for p in pts]
            ax.plot(xs, [sum(v) / len(v) for _, v in pts], "o-", label=m)
            ax.fill_between(xs, [min(v) for _, v in pts], [max(v) for _, v in pts], alpha=0.15)
        ax.set_xlabel("round (0: the bootstrap policy)")
        ax.set_ylabel(ylabel)
        ax.set_xticks(sorted({rd for _, rd in agg}))
        ax.set_title(what, fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle("\n".join(textwrap.wrap(title, 120)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def study(rounds: int, train_per_level: int, eval_per_level: int, samples: int, eval_samples: int, seed: int,
          methods: list[str], workspace: Path, family: str = "chain2", easy_eval: int | None = None, paper: bool = False,
          lrs: dict[str, float] | None = None, phase: str = "final", **update) -> list[dict]:
    """Every method from the same start on seed ``seed``; ``lrs`` gives a method its own learning rate."""
    raw = base_config(train_per_level, eval_per_level, samples, eval_samples, seed, family=family, easy_eval=easy_eval, **update)
    rows = []
    for method in methods:
        cfg = method_config(raw, method, samples, paper=paper, lr=(lrs or {}).get(method))
        lr = cfg["train"]["grpo"]["learning_rate"]
        print(f"{method} (seed {seed}, lr {lr:g}, {phase}):", flush=True)
        # one store for all methods: what they share (curate, the start's eval, round 1's rollouts and guidance
        # where their settings agree) is computed once — outputs are keyed by what they are made of
        rows += [{**r, "lr": lr, "phase": phase} for r in run_method(method, cfg, rounds, workspace, seed)]
    return rows


def tune(rates: list[float], tune_seed: int, methods: list[str], workspace: Path, **kw) -> list[dict]:
    """Each rate for each method on one seed whose problems are drawn apart from the final seeds': its held-out
    split is the validation split (the final runs are measured on their own eval splits, never on this one)."""
    rows = []
    for method in methods:
        for lr in rates:
            rows += study(seed=tune_seed, methods=[method], workspace=workspace, lrs={method: lr}, phase="tune", **kw)
    return rows


#: the easy level may lose at most this much pass@1 against the start for a rate to be chosen
EASY_LOSS = 0.02


def choose(rows: list[dict], k: int) -> tuple[dict[str, float], str]:
    """Per method, the rate with the best validation stuck-level pass@k (by answer) after the last round among
    those that keep the easy level within EASY_LOSS of the start; where none does, the best pass@k (marked).
    Returns the chosen rates and the tuning table."""
    lines = [f"| method | lr | validation stuck pass@{k} (answer) | (derivation right) | easy pass@1 | easy change | chosen |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    chosen = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == m]
        last = max(r["round"] for r in sel)
        cands = []
        for lr in dict.fromkeys(r["lr"] for r in sel):
            start = next(r for r in sel if r["lr"] == lr and r["round"] == 0)
            end = next(r for r in sel if r["lr"] == lr and r["round"] == last)
            hk = end["pass"].get("hard", {}).get(f"pass@{k}", 0.0)
            hd = (end.get("pass_with_derivation") or {}).get("hard", {}).get(f"pass@{k}", 0.0)
            e1 = end["pass"].get("easy", {}).get("pass@1", 0.0)
            change = e1 - start["pass"].get("easy", {}).get("pass@1", 0.0)
            cands.append((change >= -EASY_LOSS, hk, -lr, lr, hd, e1, change))
        best = max(cands)
        chosen[m] = best[3]
        for ok, hk, _, lr, hd, e1, change in cands:
            mark = ("yes" if ok else "yes (no rate kept the easy level)") if lr == best[3] else ""
            lines.append(f"| {m} | {lr:g} | {hk:.3f} | {hd:.3f} | {e1:.3f} | {change:+.3f} | {mark} |")
    return chosen, "\n".join(lines)


def render(rows: list[dict], k: int, setting: str, out: Path | None) -> str:
    """The tables (tuning, chosen rates, mean [min–max] of the final runs, every run) and, with ``out``, the files."""
    tuned = [r for r in rows if r.get("phase") == "tune"]
    final = [r for r in rows if r.get("phase", "final") == "final"]
    parts = [setting]
    chosen = {}
    if tuned:
        chosen, tune_table = choose(tuned, k)
        parts.append(f"Tuning (one seed, validation split; a rate is chosen by stuck pass@{k} after the last round among those "
                     f"losing at most {EASY_LOSS * 100:.0f} points of easy pass@1):\n\n{tune_table}")
    summary, agg = aggregate(final, k)
    parts += [f"Mean [min–max] over seeds (eval split):\n\n{summary}", f"Every run:\n\n{table(final, k)}"]
    md = "\n\n".join(parts)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(md + "\n")
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
        rates = ", ".join(f"{m} {lr:g}" for m, lr in chosen.items())
        chart(agg, k, out.with_suffix(".png"), setting[: setting.index("; ")] + (f"; chosen lr: {rates}" if rates else ""))
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="chain6", choices=sorted(MODELS), help="the tiny policy's task family (guidedrl bootstrap --family)")
    ap.add_argument("--model", type=Path, default=None, help="the tiny policy's checkpoint (default: the family's, under data/models)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds: problem draws, splits and sampling")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--train-per-level", type=int, default=48, help="training problems of the hard level (the easy level gets fewer)")
    ap.add_argument("--eval-per-level", type=int, default=100, help="eval problems of the hard level")
    ap.add_argument("--easy-eval", type=int, default=32, help="eval problems of the easy level")
    ap.add_argument("--samples", type=int, default=8, help="G, rollouts per problem (grpo and exprl get 2G)")
    ap.add_argument("--eval-samples", type=int, default=8, help="samples per eval problem (pass@k at k = this)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=BASE:key.path=value;...",
                    help="also run method NAME: BASE with these config overrides (e.g. "
                         "expo-linear=expo:train.grpo.expo_beta_schedule=linear); name it in --methods")
    ap.add_argument("--lr", type=float, default=5e-5, help="learning rate of the update (AdamW), every method (without --tune)")
    ap.add_argument("--tune", default=None, metavar="lr=A,B,C",
                    help="tune each method's learning rate: each rate on one seed (--tune-seed) measured on its validation split, "
                         "then each method's best rate on --seeds, measured on the eval split")
    ap.add_argument("--tune-seed", type=int, default=100, help="the tuning seed: its problems are drawn apart from the final seeds'")
    ap.add_argument("--paper", action="store_true", help="each method at its paper's loss settings (PAPER: ExPO β 0.04 on the whole "
                    "explanation, LTE γ 0.1, ExpRL's clip 0.2/0.26, KL 0.001 (k3) and the segment judge protocol)")
    ap.add_argument("--epochs", type=int, default=1, help="passes over each round's grpo dataset")
    ap.add_argument("--expo-beta", type=float, default=1.0, help="ExPO's weight of the explanation NLL term (--paper: 0.04)")
    ap.add_argument("--small", action="store_true", help="1 round, 1 seed, 8 problems per level: the test suite's version")
    ap.add_argument("--workspace", type=Path, default=None, help="keep the stage outputs here (default: a temporary directory)")
    ap.add_argument("--merge", default=None, metavar="A.json,B.json",
                    help="no runs: the tables and chart of the rows of earlier --out runs, together (e.g. methods run apart)")
    ap.add_argument("--out", type=Path, default=None, help="write PREFIX.md (tables), PREFIX.json (rows) and PREFIX.png (chart)")
    args = ap.parse_args()
    if args.small:
        args.rounds, args.train_per_level, args.eval_per_level, args.easy_eval, args.samples, args.eval_samples, args.seeds = 1, 8, 8, 8, 4, 4, "0"
    import os

    os.environ.setdefault("GUIDEDRL_PROGRESS", "0")
    k = args.eval_samples
    if args.merge:
        rows = [r for f in args.merge.split(",") for r in json.loads(Path(f).read_text())]
        seeds = sorted({r["seed"] for r in rows if r.get("phase", "final") == "final"})
        setting = (f"{', '.join(dict.fromkeys(r['method'] for r in rows))} on seeds {', '.join(map(str, seeds))} "
                   f"(runs {', '.join(Path(f).stem for f in args.merge.split(','))} merged); settings as each run's")
        print(render(rows, k, setting, args.out))
        return
    rates = None
    if args.tune:
        key, _, values = args.tune.partition("=")
        if key != "lr" or not values:
            ap.error("--tune takes lr=A,B,C (the learning rates to try)")
        rates = [float(v) for v in values.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    from tasks.core.config import ConfigError, apply_overrides

    for text in args.variant:
        try:
            name, base, over = parse_variant(text)
            apply_overrides({}, over)  # a malformed override is refused now, not after the other methods ran
        except (ValueError, ConfigError) as exc:
            ap.error(str(exc))
        VARIANTS[name] = (base, over)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS and m not in VARIANTS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}: methods are {', '.join(METHODS)}, or a --variant's name")
    t0 = time.time()
    kw = dict(rounds=args.rounds, train_per_level=args.train_per_level, eval_per_level=args.eval_per_level, samples=args.samples,
              eval_samples=k, family=args.family, easy_eval=args.easy_eval, paper=args.paper, lr=args.lr, expo_beta=args.expo_beta,
              epochs=args.epochs, model=args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ws = args.workspace or Path(tmp)
        lrs = None
        if rates:
            rows += tune(rates, args.tune_seed, methods, ws / f"tune-seed-{args.tune_seed}", **kw)
            lrs, tune_table = choose(rows, k)
            print(tune_table, flush=True)
        for seed in seeds:
            rows += study(seed=seed, methods=methods, workspace=ws / f"seed-{seed}", lrs=lrs, **kw)
    took = time.time() - t0
    beta = "ExPO's paper settings" if args.paper else f"expo_beta {args.expo_beta}"
    lr_text = f"lr tuned over {args.tune} on seed {args.tune_seed}" if rates else f"lr {args.lr}"
    setting = (f"family {args.family}, seeds {args.seeds}, {lr_text}, epochs {args.epochs}, {beta}"
               f"{', each method at its paper settings (--paper)' if args.paper else ''}, G {args.samples}, "
               f"rounds {args.rounds}, {args.train_per_level} train / {args.eval_per_level} eval hard problems, {args.easy_eval} eval easy problems, "
               f"{k} samples per eval problem; {took / 60:.1f} min on this machine")
    print(render(rows, k, setting, args.out))
    print(f"total {took:.0f}s")


if __name__ == "__main__":
    main()
