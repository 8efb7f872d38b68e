"""The token–text alignment checker: does every output of a run say, in text, what its token ids say?

``guidedrl runs check RUN_ID`` (and the tests, on every output of a pipeline run) reads a run's outputs with the
policy's tokenizer and counts, per dataset, the rows that fail each check:

- ``text``: ``decode(completion_token_ids)`` (special tokens removed) equals ``completion`` — or the row says why
  not (a text-only server's row re-tokenized as ``mismatch`` / ``none``, a failed generation);
- ``prompt``: the prompt's ids (as the sampler gets them) decode back to the prompt, start with at most one BOS
  (exactly one where the template writes it), and hold each special token of the text as that token's id;
- ``answer``: the extracted answer is the last ``\\boxed{}`` after the reasoning block of the decoded text, and no
  special token's text is in the completion;
- ``steps``: each token's ExpRL step (every ``step_split``; ``###`` cut on the token stream) equals the step found
  from character positions of decoded prefixes (never single tokens decoded and added up);
- ``sequence``: the grpo update's sequence for a row (``make_batch``, padding removed) is the ids the sampler was
  given for the plain prompt followed by exactly the sampled ids;
- ``trl``: a DPO pair tokenizes as TRL's DPO trainer tokenizes it (prompt + chosen + eos, the common prefix) to the
  sampler's prompt ids followed by the sampled ids (an eos TRL adds where the sample stopped on another stop id
  or ran out of tokens is the eos it has). A side the policy sampled in a segmentation its tokenizer would not make
  (the same text, other tokens) is counted apart (``explained``, ``notes``): TRL tokenizes text.

The reference positions here come from decoding every prefix, a different path from the pipeline's streaming
decoder (tasks/models/token_text.py); they cost O(n²) decodes per row, so ``max_rows`` bounds a dataset's rows.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from tasks.core.store import StageOutput
from tasks.models.answers import answer_region, last_boxed
from tasks.models.judge import DELIMITER, split_steps
from tasks.stages._advantages import step_advantages
from tasks.models.token_text import common_prefix_length, decode_completion, prefix_pieces, prompt_ids

CHECKS = ("text", "prompt", "answer", "steps", "sequence", "trl")
SAMPLE_DATASETS = {"rollouts": "rollouts", "explain": "explanations", "hint": "hints"}
EXPLAINED_SOURCES = ("mismatch", "none")  # a text-only server's row whose ids are left empty, and why


@dataclass
class DatasetReport:
    """One dataset's counts: rows read, rows checked per check, failures per check, a few failing rows."""

    output: str
    dataset: str
    round: str = ""  # an online run's round (``round-2``); "" for a plain run
    rows: int = 0
    checked: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    explained: int = 0
    notes: Counter = field(default_factory=Counter)
    examples: list[dict] = field(default_factory=list)

    def fail(self, check: str, row_id: str, why: str) -> None:
        self.failed[check] += 1
        if len(self.examples) < 5:
            self.examples.append({"check": check, "row": row_id, "why": why[:300]})

    def fail_note(self, check: str, why: str) -> None:
        """A row that differs for a reason that is not a fault of the pipeline (counted in ``explained``)."""
        self.notes[f"{check}: {why}"] += 1

    def as_dict(self) -> dict:
        return {"output": self.output, "dataset": self.dataset, "round": self.round, "rows": self.rows, "checked": dict(self.checked),
                "failed": dict(self.failed), "explained": self.explained, "notes": dict(self.notes), "examples": self.examples}


# ------------------------------------------------------------------------------------------------ reference positions


def prefix_starts(tokenizer, ids: list[int]) -> tuple[str, list[int], list[int]]:
    """The decoded text, and where each token starts and ends in it, by decoding every prefix (special tokens removed):
    a prefix that ends inside a character (U+FFFD) or rewrites the text so far adds nothing yet."""
    text, starts, ends, done = decode_completion(tokenizer, ids), [], [], 0
    for piece in prefix_pieces(tokenizer, list(ids)):
        starts.append(done)
        done += len(piece)
        ends.append(done)
    return text, starts, ends


def reference_token_steps(tokenizer, ids: list[int], step_split: str, steps: list[str] | None, completion: str) -> list[int] | None:
    """Each token's step from character positions: ``###`` cuts where a step's text so far ends with it (at a token
    that adds text); other splits locate the steps (the grade's, else cut from the text) in the decoded completion."""
    text, starts, ends = prefix_starts(tokenizer, ids)
    out = []
    if step_split == DELIMITER:
        step, step_start = 0, 0
        for s, e in zip(starts, ends):
            out.append(step)
            if e > s and text[step_start:e].endswith(DELIMITER):
                step, step_start = step + 1, e
        return out
    steps = steps or split_steps(completion, step_split)
    located, pos = [], 0
    for st in steps:
        at = text.find(st, pos)
        if at < 0:
            return None
        located.append(at)
        pos = at + len(st)
    for s in starts:
        k = 0
        while k + 1 < len(located) and located[k + 1] <= s:
            k += 1
        out.append(k)
    return out


# ------------------------------------------------------------------------------------------------ the checks


def special_tokens(tokenizer) -> dict[int, str]:
    """Every special token of the tokenizer (its named ones and added tokens marked special), by id."""
    out = {tokenizer.convert_tokens_to_ids(t): t for t in tokenizer.all_special_tokens if t}
    out.update({i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special})
    return out


def check_prompt(tokenizer, prompt: str) -> str | None:
    """Why ``prompt``'s ids are not what a chat template's text says, or None."""
    ids = prompt_ids(tokenizer, prompt)
    back = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if back != prompt:
        return f"its ids decode to {back[:80]!r}, not the prompt {prompt[:80]!r}"
    bos = tokenizer.bos_token_id
    if bos is not None:
        leading = common_prefix_length(ids, [bos] * len(ids))
        wants = 1 if tokenizer.bos_token and prompt.startswith(tokenizer.bos_token) else 0
        if leading != wants:
            return f"{leading} BOS at the start where the template writes {wants}"
    for tid, token in special_tokens(tokenizer).items():
        if prompt.count(token) != ids.count(tid):
            return f"{token!r} is {prompt.count(token)} times in the text but its id {tid} is {ids.count(tid)} times in the ids"
    return None


def check_samples(report: DatasetReport, tokenizer, rows: Iterable[dict]) -> None:
    """``text``, ``prompt`` (prompt and loss prompt) and ``answer`` of sample rows (rollouts, explanations, hints)."""
    specials = list(special_tokens(tokenizer).values())
    seen_prompts: dict[str, str | None] = {}
    for r in rows:
        report.rows += 1
        ids = r.get("completion_token_ids")
        if r.get("finish_reason") == "error" or r.get("token_source") in EXPLAINED_SOURCES:
            report.explained += 1
            continue
        report.checked["text"] += 1
        text = decode_completion(tokenizer, list(ids or []))
        if text != r["completion"]:
            report.fail("text", r["sample_id"], f"decode(ids) = {text[:80]!r}, completion = {r['completion'][:80]!r}")
        for p in {r.get("prompt"), r.get("loss_prompt")} - {None}:
            report.checked["prompt"] += 1
            if p not in seen_prompts:
                seen_prompts[p] = check_prompt(tokenizer, p)
            if seen_prompts[p]:
                report.fail("prompt", r["sample_id"], seen_prompts[p])
        report.checked["answer"] += 1
        boxed = last_boxed(answer_region(text))
        leaked = [t for t in specials if t in r["completion"]]
        if leaked:
            report.fail("answer", r["sample_id"], f"special tokens in the completion text: {leaked}")
        elif boxed is not None and r.get("extracted_answer") != boxed:
            report.fail("answer", r["sample_id"], f"extracted {r.get('extracted_answer')!r}, the answer after the reasoning is {boxed!r}")


def check_grpo(report: DatasetReport, tokenizer, rows: Iterable[dict], samples: dict[str, list[int]], plain_prompts: dict[str, str],
               grades: dict[str, dict], step_split: str) -> None:
    """``sequence`` and ``steps`` of grpo rows: the update's ids against the sampler's, token advantages against the
    steps found from character positions."""
    from tasks.stages._grpo_data import make_batch

    for r in rows:
        report.rows += 1
        ids = list(r["completion_token_ids"] or [])
        sampled = samples.get(r["sample_id"])
        plain = plain_prompts.get(r["problem_id"])
        if sampled is not None and plain is not None and ids:
            report.checked["sequence"] += 1
            batch = make_batch([r], tokenizer, needs_behaviour=False)
            seq = [int(t) for t, m in zip(batch.input_ids[0].tolist(), batch.attention_mask[0].tolist()) if m]
            want = prompt_ids(tokenizer, plain) + [int(t) for t in sampled]
            if seq != want:
                at = common_prefix_length(seq, want)
                report.fail("sequence", r["sample_id"], f"the update's ids differ from the sampler's prompt + sampled ids at "
                                                        f"position {at} of {len(want)}")
        adv = r.get("token_advantages")
        grade = grades.get(r["sample_id"])
        if adv is None or grade is None or not grade.get("step_scores"):
            continue
        report.checked["steps"] += 1
        step_of = reference_token_steps(tokenizer, ids, step_split, grade.get("steps") if step_split != DELIMITER else None,
                                        r["completion"])
        per_step = step_advantages(grade["step_scores"])
        if step_of is None or max(step_of, default=0) >= len(per_step):
            report.fail("steps", r["sample_id"], "the grade's steps are not found in the decoded completion")
            continue
        want = [per_step[k] for k in step_of]
        if len(want) != len(adv) or any(abs(a - b) > 1e-9 for a, b in zip(want, adv)):
            wrong = sum(abs(a - b) > 1e-9 for a, b in zip(want, adv)) + abs(len(want) - len(adv))
            report.fail("steps", r["sample_id"], f"{wrong} of {len(want)} tokens have another step's advantage")


def trl_ids(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) as TRL 1.x's DPO trainer makes them from text (trl/trainer/dpo_trainer.py,
    ``_prepare_dataset``): eos text appended where missing, prompt and prompt + completion tokenized without added
    special tokens, the completion starting where the two diverge."""
    eos = tokenizer.eos_token or ""
    if not completion.endswith(eos):
        completion += eos
    p = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    whole = list(tokenizer(prompt + completion, add_special_tokens=False)["input_ids"])
    n = common_prefix_length(p, whole)
    return p[:n], whole[n:]


def check_dpo(report: DatasetReport, tokenizer, rows: Iterable[dict], samples: dict[str, list[int]],
              stops: list[int]) -> None:
    """``trl``: each pair's prompt and both sides as TRL tokenizes them, against the sampler's ids."""
    for r in rows:
        report.rows += 1
        for side in ("chosen", "rejected"):
            sampled = samples.get(r.get(f"{side}_sample_id"))
            if sampled is None:
                continue
            report.checked["trl"] += 1
            p, c = trl_ids(tokenizer, r["prompt"], r[side])
            body = [int(t) for t in sampled]
            while body and body[-1] in stops:
                body = body[:-1]
            want_p, want_c = prompt_ids(tokenizer, r["prompt"]), body + [tokenizer.eos_token_id]
            if p == want_p and c != want_c and decode_completion(tokenizer, p + c) == decode_completion(tokenizer, p + want_c):
                # the same text written with other tokens: the policy sampled a segmentation its tokenizer would not make
                # (a BPE writes most texts several ways); TRL trains on text, so it trains on the tokenizer's
                report.explained += 1
                report.fail_note("trl", "same text, another segmentation than the sampled one (TRL tokenizes text)")
                continue
            if p != want_p or c != want_c:
                where = "prompt" if p != want_p else f"{side} at token {common_prefix_length(c, want_c)} of {len(want_c)}"
                report.fail("trl", r[f"{side}_sample_id"], f"TRL's ids differ from the sampler's in the {where}")


# ------------------------------------------------------------------------------------------------ a run's outputs


def _rows(output: StageOutput, name: str, columns: list[str], max_rows: int | None) -> Iterator[dict]:
    frame = output.scan(name)
    have = [c for c in columns if c in frame.collect_schema().names()]
    frame = frame.select(have)
    if max_rows:
        frame = frame.head(max_rows)
    yield from frame.collect().iter_rows(named=True)


def check_outputs(outputs: list[StageOutput], tokenizer, step_split: str = "auto", max_rows: int | None = None) -> list[DatasetReport]:
    """Every check on the outputs of one run (sample datasets, grades, materialize's datasets)."""
    from tasks.models.token_text import stop_token_ids

    by_stage = {o.stage: o for o in outputs}
    reports, samples, plain_prompts = [], {}, {}
    sample_cols = ["sample_id", "problem_id", "prompt", "loss_prompt", "completion", "completion_token_ids", "finish_reason",
                   "extracted_answer", "token_source", "prompt_kind"]
    for stage, name in SAMPLE_DATASETS.items():
        if stage not in by_stage or name not in by_stage[stage].manifest.get("datasets", {}):
            continue
        rep = DatasetReport(str(by_stage[stage].path), name)
        rows = list(_rows(by_stage[stage], name, sample_cols, max_rows))
        check_samples(rep, tokenizer, rows)
        for r in rows:
            samples[r["sample_id"]] = r.get("completion_token_ids") or []
            if stage == "rollouts":
                plain_prompts.setdefault(r["problem_id"], r["prompt"])
        reports.append(rep)
    grades = {}
    if "grade" in by_stage:
        grades = {g["sample_id"]: g for g in _rows(by_stage["grade"], "grades", ["sample_id", "steps", "step_scores", "parse_ok"], None)}
    if "materialize" in by_stage:
        m = by_stage["materialize"]
        rep = DatasetReport(str(m.path), "grpo")
        check_grpo(rep, tokenizer, _rows(m, "grpo", ["sample_id", "problem_id", "loss_prompt", "completion", "completion_token_ids",
                                                     "token_advantages", "advantage", "prompt_kind", "is_guided"], max_rows),
                   samples, plain_prompts, grades, step_split)
        reports.append(rep)
        rep = DatasetReport(str(m.path), "dpo")
        stops = stop_token_ids(tokenizer)
        check_dpo(rep, tokenizer, _rows(m, "dpo", ["prompt", "chosen", "rejected", "chosen_sample_id", "rejected_sample_id"], max_rows),
                  samples, stops + [i for i in _generation_stops(tokenizer) if i not in stops])
        reports.append(rep)
    return reports


def _generation_stops(tokenizer) -> list[int]:
    """Stop ids a checkpoint's generation config lists beside the tokenizer's eos (read from its directory)."""
    path = Path(getattr(tokenizer, "name_or_path", "") or "") / "generation_config.json"
    if not path.is_file():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    return [int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None]


def total_failures(reports: list[DatasetReport]) -> int:
    return sum(sum(r.failed.values()) for r in reports)


def check_run(record, tokenizer_dir: Path | None = None, max_rows: int | None = None) -> tuple[Path, list[DatasetReport]]:
    """Every check on a run's outputs (``record``: a RunRecord), round by round for an online run: (the tokenizer
    directory used, the reports). The tokenizer: ``tokenizer_dir``, else the run config's policy tokenizer."""
    from transformers import AutoTokenizer

    from tasks.registry import parse_config

    config = parse_config(record.data["config"], where=f"the config of run {record.run_id}", base_dir=Path(record.data["base_dir"]))
    path = Path(tokenizer_dir) if tokenizer_dir else config.resolve(config.policy.tokenizer or config.policy.model)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no tokenizer directory to check run {record.run_id} with (give --tokenizer)")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    rounds: dict[str, list[StageOutput]] = {}
    for name, s in record.data["stages"].items():
        if s.get("path") and Path(s["path"]).is_dir():
            rounds.setdefault(name.rpartition("/")[0], []).append(StageOutput.open(s["path"]))
    reports = []
    for name, outputs in rounds.items():
        for report in check_outputs(outputs, tokenizer, config.judge.step_split, max_rows):
            report.round = name
            reports.append(report)
    return path, reports
