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
from typing import TYPE_CHECKING, Callable

from pydantic import Field

from tasks.core import reuse
from tasks.core.config import StrictModel
from tasks.core.schemas import to_table
from tasks.core.stage import Job, Stage
from tasks.core.shards import GenerationFailed, generation_meta
from tasks.core.store import StageOutput, sha256_bytes
from tasks.models.answers import check
from tasks.models.generation import SamplingParams, checkpoint_fingerprint
from tasks.models.backends import make_backend
from tasks.models.judge import RuleJudge, derivation_right
from tasks.models.policy import chat_tokenizer, check_policy, open_backend, policy_id_for, policy_key, precision, precision_settings, render
from tasks.models.prompts import fill, load_template
from tasks.models.sampling import sample_seeds
from tasks.core.metrics import pass_table
from tasks.stages.rollouts import select_problems

if TYPE_CHECKING:
    from tasks.registry import Config


class EvalConfig(StrictModel):
    """pass@1 and pass@k on the evaluation split, by level, for the base policy and each trained checkpoint."""

    samples_per_problem: int = Field(8, gt=0, description="n samples per problem; pass@k for k = 1 and n (unbiased estimator)")
    temperature: float = Field(1.0, ge=0)
    max_new_tokens: int | None = Field(None, gt=0, description="default: rollouts.max_new_tokens")
    levels: list[str] | None = Field(None, description="only these levels (default: all)")
    max_problems: int | None = Field(None, gt=0, description="at most this many eval problems (first by problem_id)")
    seed: int = 1234
    check_derivation: bool = Field(False, description="also pass@k counting a sample only when its answer is right *and* it states "
                                   "every intermediate result of the reference (the rule judge's checkpoints, lines `a op b = c`): "
                                   "a right answer reached by a wrong path does not count. Problems whose reference has no such "
                                   "lines count by their answer")


STAGE = Stage(name="eval", version="1", module=__name__, upstream=("curate",), optional_upstream=("dpo", "grpo"),
              writes={"eval": "eval"}, directories=("charts",), section="eval", settings_model=EvalConfig)

log = logging.getLogger("guidedrl.eval")


def policies(config: Config, upstream: dict[str, StageOutput]) -> list[tuple[str, str, Path | None]]:
    """(label, policy_id, local checkpoint or None for the configured backend) of every policy to evaluate."""
    out = [("base", policy_id_for(config), None)]
    for stage in ("dpo", "grpo"):  # the checkpoints the training stages wrote
        if stage in upstream:
            ckpt = upstream[stage].path / "checkpoint"
            out.append((stage, checkpoint_fingerprint(ckpt), ckpt))
    return out


#: eval problems sent to the backend at a time: only their samples' texts are held, then only the verdicts
EVAL_BATCH = 256


def evaluate_policy(backend, tokenizer, problems: list[dict], template, params: SamplingParams,
                    check_derivation: bool = False, max_error_fraction: float = 0.0, store_root: Path | None = None,
                    key_of: Callable[[dict, str], str] | None = None,
                    ) -> tuple[dict[str, tuple[str, list[bool]]], dict[str, tuple[str, list[bool]]] | None, list[dict]]:
    """problem_id -> (level, [correct per sample]), ``EVAL_BATCH`` problems at a time; with ``check_derivation``
    also problem_id -> (level, [right answer and every reference checkpoint stated, per sample]); and the
    problems' reuse entries. With ``key_of`` (problem, prompt -> its key) a problem whose verdicts an earlier eval
    output in ``store_root`` holds is not sampled again (tasks/core/reuse.py). A failed generation is no sample
    (left out; a problem with none is left out, and never indexed); more failed prompts than
    ``max_error_fraction`` of them is ``GenerationFailed``."""
    out, derived = {}, ({} if check_derivation else None)
    judge = RuleJudge("outcome") if check_derivation else None
    failed, first, entries = 0, None, []
    for start in range(0, len(problems), EVAL_BATCH):
        batch = problems[start : start + EVAL_BATCH]
        prompts = [render(tokenizer, fill(template, p["question"])) for p in batch]
        keys = [key_of(p, prompt) for p, prompt in zip(batch, prompts)] if key_of else [None] * len(batch)
        found = reuse.lookup(store_root, STAGE.name, [k for k in keys if k]) if key_of and store_root else {}
        todo = [k for k, key in enumerate(keys) if key not in found]
        samples = backend.generate([prompts[k] for k in todo], params,
                                   [sample_seeds(params.seed, batch[k]["problem_id"], params.n) for k in todo]) if todo else []
        meta = generation_meta(samples)
        failed, first = failed + meta["errored_prompts"], first or meta["first_error"]
        groups = {k: [s for s in group if s.finish_reason != "error"] for k, group in zip(todo, samples)}
        for k, (p, key) in enumerate(zip(batch, keys)):
            if key in found:
                counts = found[key].counts
            elif groups[k]:
                verdicts = [check(s.text, p)[1] for s in groups[k]]
                counts = {"verdicts": verdicts}
                if derived is not None:
                    counts["derived"] = [derivation_right(judge, p, s.text, ok) for s, ok in zip(groups[k], verdicts)]
            else:
                continue
            out[p["problem_id"]] = (str(p["level"]), counts["verdicts"])
            if derived is not None:
                derived[p["problem_id"]] = (str(p["level"]), counts["derived"])
            if key and len(groups.get(k, counts["verdicts"])) == params.n:  # every sample generated: the next eval may reuse it
                entries.append({"problem_key": key, "problem_id": p["problem_id"], "policy_id": backend.policy_id, "part": "",
                                "row_start": 0, "num_rows": 0, "counts": counts, "reused": key in found})
    if failed > max_error_fraction * len(problems):
        where = getattr(backend, "base_url", None) or f"the {backend.name} backend"
        raise GenerationFailed.of("eval", failed, len(problems), where, max_error_fraction, first)
    return out, derived, entries


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


def preflight(config: Config) -> None:
    """Before any work: the policy can be loaded."""
    check_policy(config)


def settings(config: Config) -> dict:
    return {"eval": config.eval.model_dump(mode="json"), "max_new_tokens": config.eval.max_new_tokens or config.rollouts.max_new_tokens,
            "top_p": config.rollouts.top_p, **precision_settings(config)}


def inputs(config: Config, upstream: dict[str, StageOutput]) -> dict:
    template = load_template(config.template_path("plain"))
    return {"problems": upstream["curate"].fingerprints["problems"],
            "prompt:plain": "sha256:" + sha256_bytes(template.template.encode()),
            **{f"policy:{label}": pid for label, pid, _ in policies(config, upstream)}}


def measured_before(job: Job, pid: str) -> tuple[dict, dict | None] | None:
    """The pass tables (answers; answers with their derivation, when checked) of policy ``pid`` from an
    earlier eval output in the store with the same settings, problems and prompt (None if there is none):
    in `guidedrl online`, round k's starting policy is round k−1's checkpoint, measured there — generation
    at a fixed seed would only repeat it."""
    same = {k: v for k, v in job.inputs.items() if not k.startswith("policy:")}
    for out in job.store.outputs("eval"):
        m = out.manifest
        if m.get("config") != job.settings or any(m.get("inputs", {}).get(k) != v for k, v in same.items()):
            continue
        for key, other in m.get("inputs", {}).items():
            label = key.removeprefix("policy:")
            if key.startswith("policy:") and other == pid and label in out.summary.get("pass", {}):
                log.info("eval: %s (%s) was measured with these settings in %s; reusing its pass rates", label, pid, out.path)
                return out.summary["pass"][label], out.summary.get("pass_with_derivation", {}).get(label)
    return None


def compute(job: Job) -> StageOutput:
    config, upstream = job.config, job.upstream
    ec = config.eval
    problems = select_problems(upstream["curate"], "eval", ec.levels, ec.max_problems)
    if not problems:
        raise ValueError(f"eval: no problems in the eval split with levels {ec.levels} in {upstream['curate'].path} "
                         "(problems.eval_fraction must be above 0)")
    template = load_template(config.template_path("plain"))
    params = SamplingParams(n=ec.samples_per_problem, temperature=ec.temperature, top_p=config.rollouts.top_p,
                            max_new_tokens=ec.max_new_tokens or config.rollouts.max_new_tokens, seed=ec.seed)
    rows, tables, derivation_tables, index = [], {}, {}, []
    device, dtype = precision(config)
    for label, pid, ckpt in policies(config, upstream):
        found = measured_before(job, pid)
        if found is None:
            backend = open_backend(config) if ckpt is None else make_backend("transformers", str(ckpt), batch_size=config.policy.batch_size,
                                                                             batch_tokens=config.policy.batch_tokens, device=device, dtype=dtype)

            def key_of(problem: dict, prompt: str, backend=backend) -> str:
                seeds = sample_seeds(params.seed, problem["problem_id"], params.n)
                return reuse.key_for(STAGE, policy_key(config, backend), params, seeds, prompt, problem, check_derivation=ec.check_derivation)

            groups, derived, entries = evaluate_policy(backend, chat_tokenizer(config, backend), problems, template, params,
                                                       ec.check_derivation, config.policy.max_error_fraction,
                                                       None if job.force else job.store.root, key_of)
            index.extend(entries)
            found = pass_table(groups), (pass_table(derived) if derived is not None else None)
        tables[label] = table = found[0]
        if ec.check_derivation:
            derivation_tables[label] = found[1]
        n = ec.samples_per_problem
        for level, entry in table.items():
            rows.append({"policy_id": pid, "level": level, "n": entry["n"], "pass_at_1": entry["pass@1"],
                         "pass_at_k": entry[f"pass@{n}"], "k": n, "policy": label, "problems": entry["problems"]})
    with job.scratch() as tmp:
        charts = tmp / "charts"
        charts.mkdir()
        chart(rows, charts / "eval.png")
        reused = sum(e["reused"] for e in index)
        summary = {"problems": len(problems), "n": ec.samples_per_problem, "pass": tables, "reused_problems": reused,
                   "sampled_problems": len(index) - reused}
        if ec.check_derivation:
            summary["pass_with_derivation"] = derivation_tables
        reuse.write_entries(index, tmp / reuse.INDEX_DIR)
        out = job.write({"eval": to_table(rows, "eval", "eval/eval")}, summary, dataset_summaries={"eval": summary},
                        directories={"charts": charts, reuse.INDEX_DIR: tmp / reuse.INDEX_DIR})
    log.info("eval: %d eval problems x %d samples; pass@1 %s -> %s", len(problems), ec.samples_per_problem,
             {label: {lvl: v["pass@1"] for lvl, v in t.items()} for label, t in tables.items()}, out.path / "charts" / "eval.png")
    return out


def describe(s: dict) -> str:
    note = (f"; (policy, problem) pairs sampled {s['sampled_problems']}, reused {s['reused_problems']}"
            if "reused_problems" in s else "")
    return f"{s.get('problems')} eval problems x {s.get('n')} samples: see the before/after table{note}"
