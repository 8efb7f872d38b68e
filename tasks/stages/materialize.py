"""Stage `materialize`: rollouts, guidance samples and grades as the training
datasets other teams use — `dpo`, `grpo` and `sft` — each with a dataset card.

Inputs: `problems`, the plain `rollouts`, ExPO `explanations`, LTE `hints`, reference-prefix `prefixed` samples,
self-hinted `self_hints` samples, `grades`.

- `dpo` (the columns TRL's DPOTrainer reads, plus `problem_id`, `chosen_kind`,
  `rejected_kind`): per problem, up to `pairs_per_problem` pairs of each kind —
  a selected self-explanation vs one of the policy's own wrong samples
  (ExPO-DPO), a correct rollout vs a wrong one where both exist, a correct
  hinted sample vs a wrong plain one. `prompt` is always the original question
  prompt (`loss_prompt`), never the guided one.
- `grpo`: one row per sample of each problem's group (`group_id`). `reward` is
  the verified answer (1/0), or with `reward: judge` the judge's outcome score;
  `advantage` is group-normalised, (r − mean)/std (`advantage: grpo`) or
  r − mean (`dr_grpo`, Dr. GRPO without the std). LTE: in a group whose samples
  all failed, failed samples are replaced by correct hinted ones (at most G − 1,
  so that the group keeps a failure to learn from). Groups whose rewards are all
  equal carry no signal: dropped (dynamic sampling) unless `keep_uniform_groups`,
  counted either way. Process grades give `token_advantages`: each token gets
  its step's s_t − s_(t−1) (first step s_1 − s_T, DESIGN.md). A trace whose grade
  did not parse keeps its row with a null reward and advantage (masked). ExPO's
  selected explanations ride along with `prompt_kind = 'explain'` and a null
  advantage: they feed only the β-NLL term. Prefix and self-hint samples
  (`include_prefixed`, `include_self_hints`): with their stage's `loss: guided`
  a group of their own per problem (`g-<problem>-<kind>`, on-policy under the
  prompt they were shown, rewards verified, dropped when uniform like any
  group); with `loss: plain` the right ones join LTE's replacement of failed
  samples in all-failed groups (guided rows, the shaped ratio).
- `sft`: verified correct samples and selected explanations with the original prompt.
"""

from __future__ import annotations

import logging
import random
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Literal

import polars as pl
import pyarrow.parquet as pq
from pydantic import Field

from tasks.core.config import StrictModel
from tasks.core.groups import partition, read_chunk
from tasks.core.parts import PartWriter
from tasks.core.schemas import kind_counts, to_table
from tasks.core.stage import Job, Stage
from tasks.core.store import StageOutput
from tasks.models.token_text import continuation_text
from tasks.stages._advantages import group_advantages, token_advantages
from tasks.stages._materialize_cards import dataset_card
from tasks.stages._materialize_io import chunk_sources, grpo_table, read_without_token_lists
from tasks.core import progress

if TYPE_CHECKING:
    from tasks.registry import Config


class MaterializeConfig(StrictModel):
    """How rollouts, guidance samples and grades become the dpo, grpo and sft datasets."""

    reward: Literal["verify", "judge"] = Field("verify", description="verify: the checked answer (1/0); judge: the judge's outcome score (+ token advantages in process mode)")
    advantage: Literal["grpo", "dr_grpo"] = Field("grpo", description="the advantage estimator (tasks/stages/_advantages.py: ADVANTAGES): "
                                                  "grpo: (r - mean) / std in the group; dr_grpo: r - mean")
    keep_uniform_groups: bool = Field(False, description="keep groups whose rewards are all equal (no signal); default: drop them (dynamic sampling)")
    lte_replace: bool = Field(True, description="LTE: in all-failed groups, replace failed samples by correct hinted ones (at most G - 1)")
    include_explanations: bool = Field(True, description="ExPO: selected explanations ride along in grpo (null advantage, for the beta-NLL term)")
    include_prefixed: bool = Field(False, description="reference-prefix samples (stage prefix) in grpo: a group of their own per "
                                   "problem (prefix.loss: guided) or replacing failed rollouts (plain)")
    include_self_hints: bool = Field(False, description="self-hinted samples (stage self_hint) in grpo: a group of their own per "
                                     "problem (self_hint.loss: guided) or replacing failed rollouts (plain)")
    pairs_per_problem: int = Field(2, gt=0, description="DPO pairs per problem and pair kind")
    dpo_pairs: list[Literal["explain", "plain", "hint"]] = Field(
        ["explain", "plain", "hint"], min_length=1, description="the DPO pair kinds, by the chosen side: explain (a selected "
        "self-explanation over a wrong sample: [explain] alone is ExP-DPO), plain (a right over a wrong rollout), hint (a right "
        "hinted sample over a wrong rollout)")
    seed: int = Field(0, description="LTE: which failed samples of a group the hinted ones replace (chosen at random per problem)")
    export: list[Literal["verl", "trl", "openrlhf", "hf"]] = Field(
        [], description="also write these trainers' layouts into the output's exports/ directory (tasks/core/export.py): trl and "
        "openrlhf get dpo and sft (trl as conversations where the policy has a chat template), hf every dataset, verl the curated "
        "problems with the run's explanations and hints, and sft as chat messages")


STAGE = Stage(name="materialize", version="2", module=__name__, upstream=("curate", "rollouts"), optional_upstream=("explain", "hint", "prefix", "self_hint", "grade"),
              writes={"dpo": "dpo", "grpo": "grpo", "sft": "sft"}, section="materialize", settings_model=MaterializeConfig)

log = logging.getLogger("guidedrl.materialize")


# --------------------------------------------------------------------------- building the datasets


def continuation(row: dict, tokenizer) -> str:
    """A sample's text as it follows the loss prompt (the ``chosen`` / ``rejected`` / sft ``completion`` a trainer
    puts after ``prompt`` and tokenizes whole, as TRL does): the prompt's and the sampled ids decoded together, where
    the policy's tokenizer and the ids are at hand (a SentencePiece completion keeps its first word's space); else
    the completion text."""
    ids = row.get("completion_token_ids")
    if tokenizer is None or ids is None or not len(ids):
        return row["completion"]
    text = continuation_text(tokenizer, row["loss_prompt"], ids)
    return row["completion"] if text is None else text


def _pairs(chosen: list[dict], rejected: list[dict], n: int, kinds: tuple[str, str], tokenizer=None) -> list[dict]:
    if not chosen or not rejected:
        return []
    out = []
    for i in range(min(n, max(len(chosen), len(rejected)))):
        c, r = chosen[i % len(chosen)], rejected[i % len(rejected)]
        if c["completion"] == r["completion"]:
            continue
        out.append({"prompt": c["loss_prompt"], "chosen": continuation(c, tokenizer), "rejected": continuation(r, tokenizer),
                    "problem_id": c["problem_id"], "chosen_kind": kinds[0], "rejected_kind": kinds[1],
                    "chosen_sample_id": c["sample_id"], "rejected_sample_id": r["sample_id"]})
    return out


def _grpo_row(r: dict, group_id: str, reward: float | None, guided: bool) -> dict:
    if "_at" in r:  # read by compute: only where the row is (``_at``) and what build decides; the rest is taken from Arrow
        return {"_at": r["_at"], "group_id": group_id, "reward": reward, "advantage": None, "token_advantages": None, "is_guided": guided}
    return {"sample_id": r["sample_id"], "group_id": group_id, "loss_prompt": r["loss_prompt"],
           "completion_token_ids": r.get("completion_token_ids"), "reward": reward, "advantage": None,
           "token_advantages": None, "behaviour_logprobs": r.get("behaviour_logprobs"),
           "loss_logprobs": r.get("loss_logprobs") if guided else (r.get("loss_logprobs") or r.get("behaviour_logprobs")),
           "temperature": r["temperature"], "is_guided": guided, "prompt_kind": r["prompt_kind"], "problem_id": r["problem_id"],
           "completion": r["completion"], "correct": bool(r["correct"])}


#: the guidance whose samples train in grpo as their own groups or as replacements: stage -> dataset
GUIDED_SAMPLES = {"prefix": "prefixed", "self_hint": "self_hints"}


def _guided_rows(config: Config, samples: dict[str, list[dict]]) -> tuple[dict, dict]:
    """The samples of ``GUIDED_SAMPLES`` that this config trains on, by problem: (kind -> problem -> rows of a group of
    their own, problem -> [(kind, right row)] that replace failed rollouts)."""
    mc = config.materialize
    use = {"prefix": mc.include_prefixed, "self_hint": mc.include_self_hints}
    own: dict[str, dict[str, list[dict]]] = {}
    replacing: dict[str, list[tuple[str, dict]]] = defaultdict(list)
    for kind, name in GUIDED_SAMPLES.items():
        if not use[kind]:
            continue
        if getattr(config, kind).loss == "guided":
            own[kind] = defaultdict(list)
            for r in samples.get(name, ()):
                own[kind][r["problem_id"]].append(r)
        else:
            for r in samples.get(name, ()):
                if r["correct"]:
                    replacing[r["problem_id"]].append((kind, r))
    return own, replacing


def _finish_group(rows: list[dict], mc: MaterializeConfig, counts: Counter, grpo: list[dict]) -> bool:
    """Advantages into a group's rows; the group into ``grpo`` unless its rewards are uniform (and dropped). Returns
    whether it is uniform."""
    counts["masked_samples"] += sum(r["reward"] is None for r in rows)
    for row, adv in zip(rows, group_advantages([r["reward"] for r in rows], mc.advantage)):
        row["advantage"] = adv
    rewards = {r["reward"] for r in rows if r["reward"] is not None}
    # ExpRL process mode: a group whose rewards are all equal still teaches when its steps are graded differently
    stepped = any(a for r in rows for a in (r["token_advantages"] or ()))
    uniform = len(rewards) <= 1 and not stepped
    counts["uniform_groups"] += uniform
    if uniform and not mc.keep_uniform_groups:
        counts["dropped_groups"] += 1
    else:
        grpo += rows
        counts["groups"] += 1
    return uniform


def build(config: Config, rollouts: list[dict], explanations: list[dict], hints: list[dict], grades: dict[str, dict],
          tokenizer=None, samples: dict[str, list[dict]] | None = None) -> tuple[dict[str, list[dict]], dict]:
    """The dpo, grpo and sft rows, and the counts of the summary (``samples``: dataset name -> the rows of the
    guidance of ``GUIDED_SAMPLES``)."""
    mc = config.materialize
    own, replacing = _guided_rows(config, samples or {})
    plain, expl, hinted = defaultdict(list), defaultdict(list), defaultdict(list)
    for r in rollouts:
        if r["finish_reason"] != "error":
            plain[r["problem_id"]].append(r)
    for r in explanations:
        if r.get("selected"):
            expl[r["problem_id"]].append(r)
    for r in hints:
        if r["correct"]:
            hinted[r["problem_id"]].append(r)

    dpo, grpo, sft = [], [], []
    counts: Counter = Counter()
    for pid in sorted(plain):
        group = sorted(plain[pid], key=lambda r: r["sample_idx"])
        right = [r for r in group if r["correct"]]
        wrong = [r for r in group if not r["correct"]]
        # DPO pairs: the prompt is always the original question prompt
        for kind, chosen in (("explain", expl[pid]), ("plain", right), ("hint", hinted[pid])):
            if kind in mc.dpo_pairs:
                dpo += _pairs(chosen, wrong, mc.pairs_per_problem, (kind, "plain"), tokenizer)
        sft += [{"prompt": r["loss_prompt"], "completion": continuation(r, tokenizer), "problem_id": pid,
                 "prompt_kind": r["prompt_kind"], "sample_id": r["sample_id"]} for r in right + hinted[pid] + expl[pid]]

        # GRPO group
        group_id = f"g-{pid}"
        rows = []
        for r in group:
            overlong = mc.reward == "judge" and config.judge.overlong == "zero" and r["finish_reason"] == "length"
            if overlong:  # ExpRL: a truncated trace gets reward 0, whatever the judge made of it
                reward = 0.0
            elif mc.reward == "judge":
                g = grades.get(r["sample_id"])
                reward = g["outcome_score"] if g and g["parse_ok"] else None
            else:
                reward = 1.0 if r["correct"] else 0.0
            row = _grpo_row(r, group_id, reward, guided=False)
            if mc.reward == "judge" and not overlong:
                row["token_advantages"] = token_advantages(r, grades.get(r["sample_id"]), tokenizer, config.judge.step_split)
            rows.append(row)
        pool = [("hint", h) for h in hinted[pid]] if mc.lte_replace else []
        pool += replacing.get(pid, [])
        if not right and pool:
            n = min(len(pool), len(rows) - 1)
            replaced = random.Random(f"{mc.seed}:{pid}").sample(range(len(rows)), n)  # failed samples chosen at random
            for i, (kind, h) in zip(sorted(replaced), pool[:n]):
                rows[i] = _grpo_row(h, group_id, 1.0, guided=True)
                counts["lte_replaced_samples" if kind == "hint" else f"{kind}_replaced_samples"] += 1
            counts["lte_groups"] += 1 if n and pool[0][0] == "hint" else 0
        if not right:  # a stuck group: does the process grade give it any signal the answer does not?
            counts["all_fail_groups"] += 1
            counts["all_fail_groups_with_token_advantages"] += any(a for r in rows for a in (r["token_advantages"] or ()))
        _finish_group(rows, mc, counts, grpo)
        for kind, by_problem in own.items():  # prefix / self-hint samples on-policy under their own prompt: their own group
            group = sorted(by_problem.get(pid, ()), key=lambda r: r["sample_idx"])
            if group:
                counts[f"{kind}_groups"] += 1
                counts[f"{kind}_uniform_groups"] += _finish_group(
                    [_grpo_row(r, f"{group_id}-{kind}", 1.0 if r["correct"] else 0.0, guided=False) for r in group], mc, counts, grpo)
        if mc.include_explanations:  # ExPO's β-NLL term: kept whatever the group's rewards
            for e in expl[pid]:
                grpo.append(_grpo_row(e, group_id, None, guided=True))
                counts["explanation_rows"] += 1
    return {"dpo": dpo, "grpo": grpo, "sft": sft}, dict(counts)


# --------------------------------------------------------------------------- the stage


def reads(config: Config, run: set[str]) -> dict[str, str | None]:
    """The guidance this config's training reads, in a run of the stages ``run``: each guidance stage -> None where read,
    else why not. Explanations: ExPO's term in grpo (``include_explanations``) or ExP-DPO pairs (``dpo_pairs`` explain);
    hints: LTE's replacement (``lte_replace``) or hinted DPO pairs; prefix and self-hint samples: grpo with
    ``include_prefixed`` / ``include_self_hints`` (also without a trainer: no dataset holds them otherwise); grades: the judge's rewards (``reward: judge``) or
    ``judge.grade: always``. A run without a trainer (the datasets alone asked for) reads every guidance there is."""
    m = config.materialize
    grpo, dpo = "grpo" in run, "dpo" in run
    samples = {"prefix": None if m.include_prefixed else "materialize.include_prefixed is false: no dataset holds its samples",
               "self_hint": None if m.include_self_hints else "materialize.include_self_hints is false: no dataset holds its samples"}
    if not (grpo or dpo):
        return {"explain": None, "hint": None, **samples, "grade": None}

    def reason(kind: str, grpo_flag: str) -> str:
        said = [f"grpo: materialize.{grpo_flag} is false"] if grpo else []
        said += [f"dpo: materialize.dpo_pairs has no {kind} pairs"] if dpo else []
        return "no update in this run reads it (" + "; ".join(said) + ")"

    explain = (grpo and m.include_explanations) or (dpo and "explain" in m.dpo_pairs)
    hint = (grpo and m.lte_replace) or (dpo and "hint" in m.dpo_pairs)
    grade = m.reward == "judge" or config.judge.grade == "always"
    return {"explain": None if explain else reason("explain", "include_explanations"),
            "hint": None if hint else reason("hint", "lte_replace"),
            "prefix": None if grpo and m.include_prefixed else
            ("no update in this run reads it (grpo: materialize.include_prefixed is false)" if grpo else "only grpo reads it (no DPO pairs)"),
            "self_hint": None if grpo and m.include_self_hints else
            ("no update in this run reads it (grpo: materialize.include_self_hints is false)" if grpo else "only grpo reads it (no DPO pairs)"),
            "grade": None if grade else "the rewards are the verified answers (materialize.reward: verify) and judge.grade is when_used"}


def settings(config: Config) -> dict:
    return {"materialize": config.materialize.model_dump(mode="json"), "step_split": config.judge.step_split,
            **{f"{kind}_loss": getattr(config, kind).loss for kind in GUIDED_SAMPLES},
            "overlong": config.judge.overlong, "mode": config.judge.mode, "tokenizer": config.policy.tokenizer or config.policy.model}


def inputs(config: Config, upstream: dict[str, StageOutput]) -> dict:
    reads = {"explain": "explanations", "hint": "hints", **GUIDED_SAMPLES, "grade": "grades"}  # (the guidance this run reads: upstream_of)
    return {"problems": upstream["curate"].fingerprints["problems"], "rollouts": upstream["rollouts"].fingerprints["rollouts"],
            **{name: upstream[stage].fingerprints[name] for stage, name in reads.items() if stage in upstream}}


def policy_tokenizer(config: Config):
    """The policy's tokenizer from disk (the pairs' and sft texts as they follow the prompt; token advantages), or None
    where there is none. Token advantages (reward: judge in process mode) need it: without one they would silently
    become the outcome advantage, so that is an error instead."""
    path = config.resolve(config.policy.tokenizer or config.policy.model)
    if not path.is_dir() and (config.materialize.reward != "judge" or config.judge.mode != "process"):
        return None
    if not path.is_dir():
        raise ValueError(f"materialize: reward: judge in process mode needs the policy's tokenizer to give each token its step's "
                         f"advantage; {path} is not a directory (set policy.tokenizer to a local tokenizer directory)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


#: rollouts per chunk of whole problems (tasks/core/groups.py): bounds the stage's memory, not its output
CHUNK_ROWS = 4096


class Tally:
    """The summary's counts, added up chunk by chunk (ids and counters only, never rows)."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.rows: Counter = Counter()
        self.by_kind = {"dpo": Counter(), "sft": Counter()}
        self.dpo_problems: set[str] = set()
        self.with_token_advantages = 0
        self.grpo_by_kind: Counter = Counter({k: 0 for k in ("plain", "guided", "explain", "masked")})

    def add(self, data: dict[str, list[dict]], counts: dict) -> None:
        self.counts.update(counts)
        self.rows.update({n: len(rows) for n, rows in data.items()})
        self.by_kind["dpo"].update(f"{r['chosen_kind']}>{r['rejected_kind']}" for r in data["dpo"])
        self.by_kind["sft"].update(r["prompt_kind"] for r in data["sft"])
        self.dpo_problems.update(r["problem_id"] for r in data["dpo"])
        self.with_token_advantages += sum(r["token_advantages"] is not None for r in data["grpo"])

    def summaries(self, mc: MaterializeConfig) -> dict:
        c = self.counts
        return {
            "dpo": {"pairs": self.rows["dpo"], "by_kind": dict(self.by_kind["dpo"]), "problems": len(self.dpo_problems),
                    "pair_kinds": list(mc.dpo_pairs)},
            "grpo": {"rows": self.rows["grpo"], "reward": mc.reward, "advantage": mc.advantage,
                     "groups_kept": c.get("groups", 0), "uniform_groups": c.get("uniform_groups", 0),
                     "uniform_groups_dropped": c.get("dropped_groups", 0),
                     "lte_groups": c.get("lte_groups", 0), "lte_replaced_samples": c.get("lte_replaced_samples", 0),
                     **{f"{k}_{what}": c.get(f"{k}_{what}", 0) for k in GUIDED_SAMPLES for what in ("groups", "uniform_groups", "replaced_samples")},
                     "explanation_rows": c.get("explanation_rows", 0), "masked_samples": c.get("masked_samples", 0),
                     "with_token_advantages": self.with_token_advantages, "all_fail_groups": c.get("all_fail_groups", 0),
                     "all_fail_groups_with_token_advantages": c.get("all_fail_groups_with_token_advantages", 0),
                     "rows_by_kind": dict(self.grpo_by_kind)},
            "sft": {"rows": self.rows["sft"], "by_kind": dict(self.by_kind["sft"])},
        }


#: a dataset's rows are gathered up to this many bytes before a part file is written: Parquet wrote a
#: chunk's few thousand rows (one row group) at about half the speed of tens of thousands
PART_BYTES = 64 << 20


def compute(job: Job) -> StageOutput:
    """``build`` on one chunk of whole problems at a time (tasks/core/groups.py), the rows written
    as they go (part files of ``PART_BYTES``): memory is bounded by ``CHUNK_ROWS`` rollouts,
    and the rows and their order are those of ``build`` on all problems at once."""
    config, upstream = job.config, job.upstream
    tokenizer = policy_tokenizer(config)
    tally = Tally()
    with job.scratch() as work:
        writers = {n: PartWriter(work / "parts", n, max_bytes=PART_BYTES, at_least_one=True,  # no rows at all: one empty part
                                 to_table=lambda rows, n=n: to_table(rows, n, f"materialize/{n}")) for n in STAGE.writes}
        with_grades = config.materialize.reward == "judge"  # else build reads no grade
        main, others = chunk_sources(upstream, with_grades, {"explain": "explanations", "hint": "hints", **GUIDED_SAMPLES})
        chunks = partition(main, others, CHUNK_ROWS, work / "chunks")
        for chunk in progress.track(chunks, f"materialize: {len(chunks)} chunks of whole problems"):
            read, taken_from = {}, {}
            for name in ("main", "explanations", "hints", *GUIDED_SAMPLES.values()):
                if name in chunk:  # (guidance this run does not read is not there)
                    read[name], taken_from[name] = read_without_token_lists(chunk[name], name, keep_ids=tokenizer is not None)
            grades = {g["sample_id"]: g for g in read_chunk(chunk["grades"]).to_pylist()} if with_grades else {}
            data, counts = build(config, read["main"], read.get("explanations", []), read.get("hints", []), grades, tokenizer,
                                 {name: read[name] for name in GUIDED_SAMPLES.values() if name in read})
            del read, grades
            tally.add(data, counts)
            for name, rows in data.items():
                if rows:  # a chunk without rows of a dataset adds no part (an empty table would lack the extra columns)
                    table = grpo_table(rows, taken_from) if name == "grpo" else to_table(rows, name, f"materialize/{name}")
                    if name == "grpo":  # what the update will train on, counted while the rows are at hand
                        tally.grpo_by_kind.update(kind_counts(pl.from_arrow(table).lazy()))
                    writers[name].add(table)
        parts = {n: w.close() for n, w in writers.items()}
        summaries = tally.summaries(config.materialize)
        cards = {n: dataset_card(n, n, tally.rows[n], summaries[n], job.inputs, job.settings, pq.read_schema(parts[n][0]).names)
                 for n in parts}
        exports = _exports(job, parts, work) if config.materialize.export else {}
        if exports:
            summaries["exports"] = {k: {"files": v["files"]} for k, v in exports.items()}
        out = job.write(parts, summaries, dataset_summaries=summaries, cards=cards,
                        directories={"exports": work / "exports"} if exports else None)
    counts = tally.counts
    guided = "".join(f", {counts.get(f'{k}_groups', 0)} {k} groups ({counts.get(f'{k}_uniform_groups', 0)} uniform), "
                     f"{counts.get(f'{k}_replaced_samples', 0)} samples replaced by {k}" for k in GUIDED_SAMPLES if counts.get(f"{k}_groups")
                     or counts.get(f"{k}_replaced_samples"))
    log.info("materialize: %d DPO pairs %s, %d GRPO rows in %d groups (%d uniform groups %s, %d samples replaced by LTE, "
             "%d explanation rows%s), %d SFT rows, from %d chunks of whole problems -> %s", tally.rows["dpo"], summaries["dpo"]["by_kind"],
             tally.rows["grpo"], counts.get("groups", 0), counts.get("uniform_groups", 0),
             "kept" if config.materialize.keep_uniform_groups else "dropped", counts.get("lte_replaced_samples", 0),
             counts.get("explanation_rows", 0), guided, tally.rows["sft"], len(chunks), out.path)
    return out


def _exports(job: Job, parts: dict[str, list], work) -> dict[str, dict]:
    """``materialize.export``: the datasets (their part files linked into a scratch directory),
    exported from there into ``work/exports`` (which becomes the output's exports/ directory)."""
    from tasks.core.export import export_datasets
    from tasks.core.store import write_dataset_files

    paths = {}
    for name, files in parts.items():
        write_dataset_files(work / "datasets" / name, STAGE.writes[name], files, {"name": name})
        paths[name] = work / "datasets" / name
    up = job.upstream
    guidance = [up[stage].dataset_path(name) for stage, name in (("explain", "explanations"), ("hint", "hints"), *GUIDED_SAMPLES.items())
                if stage in up]
    tokenizer = job.config.resolve(job.config.policy.tokenizer or job.config.policy.model)
    done = export_datasets(paths, list(job.config.materialize.export), work / "exports", guidance=[g for g in guidance if g.is_dir()],
                           problems=up["curate"].dataset_path("problems"), tokenizer=tokenizer if tokenizer.is_dir() else None)
    log.info("materialize: exported %s", ", ".join(f"{k} ({sum(f['rows'] for f in v['files'].values())} rows)" for k, v in done.items()))
    return done


def describe(s: dict) -> str:
    g = s.get("grpo", {})
    return (f"dpo: {s.get('dpo', {}).get('pairs')} pairs {s.get('dpo', {}).get('by_kind')}; grpo: {g.get('rows')} rows in "
            f"{g.get('groups_kept')} groups ({g.get('uniform_groups_dropped')} uniform groups dropped, "
            f"{g.get('lte_replaced_samples')} samples replaced by LTE); sft: {s.get('sft', {}).get('rows')} rows")
