"""Stage `eval`: pass@1 and pass@k on the evaluation split, by level, for the
base policy and the checkpoints the `dpo` and `grpo` stages trained.

n samples per problem (`eval.samples_per_problem`) at `eval.temperature` with
the plain prompt; answers checked like the rollouts'; pass@k is the unbiased
estimator over the n samples (k = 1 and k = n). Output: dataset `eval`
(`policy_id`, `level`, `n`, `pass_at_1`, `pass_at_k`, `k`, plus `policy` — base,
dpo or grpo — and `problems`) and `charts/eval.png`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tasks.answers import check
from tasks.config import Config
from tasks.generation import SamplingParams, checkpoint_fingerprint, make_backend
from tasks.metrics import pass_table
from tasks.prompts import fill, load_template
from tasks.rollouts import chat_tokenizer, open_backend, policy_id_for, render, select_problems
from tasks.schemas import to_table
from tasks.store import StageOutput, Store, sha256_bytes, stage_key

STAGE = "eval"
STAGE_VERSION = "1"

log = logging.getLogger("guidedrl.eval")


def policies(config: Config, upstream: dict[str, StageOutput]) -> list[tuple[str, str, Path | None]]:
    """(label, policy_id, local checkpoint or None for the configured backend) of every policy to evaluate."""
    out = [("base", policy_id_for(config), None)]
    for stage in ("dpo", "grpo"):  # the checkpoints the training stages wrote
        if stage in upstream:
            ckpt = upstream[stage].path / "checkpoint"
            out.append((stage, checkpoint_fingerprint(ckpt), ckpt))
    return out


def evaluate_policy(backend, tokenizer, problems: list[dict], template, params: SamplingParams) -> dict[str, tuple[str, list[bool]]]:
    """problem_id -> (level, [correct per sample])."""
    prompts = [render(tokenizer, fill(template, p["question"])) for p in problems]
    samples = backend.generate(prompts, params)
    return {p["problem_id"]: (str(p["level"]), [s.finish_reason != "error" and check(s.text, p)[1] for s in group])
            for p, group in zip(problems, samples)}


def chart(rows: list[dict], path: Path) -> None:
    """Grouped bars: pass@1 and pass@n by level, one colour per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted({r["level"] for r in rows})
    labels = list(dict.fromkeys(r["policy"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    width = 0.8 / max(1, len(labels))
    for ax, metric, title in ((axes[0], "pass_at_1", "pass@1"), (axes[1], "pass_at_k", f"pass@{rows[0]['k']}" if rows else "pass@k")):
        for j, label in enumerate(labels):
            vals = [next((r[metric] for r in rows if r["level"] == lvl and r["policy"] == label), 0.0) for lvl in levels]
            bars = ax.bar([i + j * width for i in range(len(levels))], vals, width, label=label)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(levels))], levels)
        ax.set_title(title)
        ax.set_ylim(0, 1.08)
    axes[0].set_ylabel("eval split")
    axes[1].legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def key_for(config: Config, upstream: dict[str, StageOutput]) -> tuple[str, dict, dict]:
    stage_cfg = config.stage_config(STAGE)
    template = load_template(config.template_path("plain"))
    inputs = {"problems": upstream["curate"].fingerprints["problems"],
              "prompt:plain": "sha256:" + sha256_bytes(template.template.encode()),
              **{f"policy:{label}": pid for label, pid, _ in policies(config, upstream)}}
    return stage_key(STAGE, stage_cfg, inputs, STAGE_VERSION), stage_cfg, inputs


def run(config: Config, store: Store, upstream: dict[str, StageOutput], force: bool = False) -> tuple[StageOutput, bool]:
    key, stage_cfg, inputs = key_for(config, upstream)
    existing = store.reusable(STAGE, key, force)
    if existing is not None:
        return existing, True
    ec = config.eval
    problems = select_problems(upstream["curate"].read("problems"), "eval", ec.levels, ec.max_problems)
    if not problems:
        raise ValueError(f"eval: no problems in the eval split with levels {ec.levels} in {upstream['curate'].path} "
                         "(problems.eval_fraction must be above 0)")
    template = load_template(config.template_path("plain"))
    params = SamplingParams(n=ec.samples_per_problem, temperature=ec.temperature, top_p=config.rollouts.top_p,
                            max_new_tokens=ec.max_new_tokens or config.rollouts.max_new_tokens, seed=ec.seed)
    rows, tables = [], {}
    for label, pid, ckpt in policies(config, upstream):
        backend = open_backend(config) if ckpt is None else make_backend("transformers", str(ckpt), batch_size=config.policy.batch_size)
        groups = evaluate_policy(backend, chat_tokenizer(config, backend), problems, template, params)
        table = pass_table(groups)
        tables[label] = table
        n = ec.samples_per_problem
        for level, entry in table.items():
            rows.append({"policy_id": pid, "level": level, "n": entry["n"], "pass_at_1": entry["pass@1"],
                         "pass_at_k": entry[f"pass@{n}"], "k": n, "policy": label, "problems": entry["problems"]})
    with store.scratch(STAGE) as tmp:
        charts = tmp / "charts"
        charts.mkdir()
        chart(rows, charts / "eval.png")
        summary = {"problems": len(problems), "n": ec.samples_per_problem, "pass": tables}
        out = store.write(STAGE, key, {"eval": ("eval", to_table(rows, "eval", "eval/eval"))}, config=stage_cfg, inputs=inputs,
                          stage_version=STAGE_VERSION, summary=summary, replace=force, dataset_summaries={"eval": summary},
                          directories={"charts": charts})
    log.info("eval: %d eval problems x %d samples; pass@1 %s -> %s", len(problems), ec.samples_per_problem,
             {label: {lvl: v["pass@1"] for lvl, v in t.items()} for label, t in tables.items()}, out.path / "charts" / "eval.png")
    return out, False
