"""How many tokens of a run's graded traces the old way put on another ExpRL step than their own.

    python bench/token_steps.py WORKSPACE RUN_ID [--tokenizer DIR]

For every grpo row with token advantages (process rewards), each token's step three ways: from decoded prefixes
(the reference, tasks/report/alignment.py), from the pipeline's spans (tasks/models/token_text.py), and as guidedrl
did before real tokenizers (each token decoded alone, lengths added up). A token on another step gets another
step's advantage whenever two steps' scores differ; where they are equal the stored advantages cannot show it, so
this counts step indices, not values. Prints the counts and the old way's share against the spans'.
"""

from __future__ import annotations

import argparse
from bisect import bisect_right
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workspace", type=Path)
    ap.add_argument("run_id")
    ap.add_argument("--tokenizer", type=Path)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from tasks.core.store import StageOutput
    from tasks.models.token_text import token_spans, token_step_index
    from tasks.registry import parse_config
    from tasks.report.alignment import reference_token_steps
    from tasks.report.runs import RunRecord

    record = RunRecord.load(args.workspace, args.run_id)
    config = parse_config(record.data["config"], base_dir=Path(record.data["base_dir"]))
    tok = AutoTokenizer.from_pretrained(str(args.tokenizer or config.resolve(config.policy.tokenizer or config.policy.model)))
    split = config.judge.step_split
    outputs: dict[str, dict[str, StageOutput]] = {}
    for name, s in record.data["stages"].items():
        if s.get("path"):
            outputs.setdefault(name.rpartition("/")[0], {})[name.rpartition("/")[2]] = StageOutput.open(s["path"])
    rows = tokens = old_wrong = new_wrong = rows_old_wrong = 0
    for stages in outputs.values():
        if "materialize" not in stages or "grade" not in stages:
            continue
        grades = {g["sample_id"]: g for g in stages["grade"].scan("grades").select("sample_id", "steps").collect().iter_rows(named=True)}
        grpo = stages["materialize"].scan("grpo").select("sample_id", "completion", "completion_token_ids", "token_advantages").collect()
        for r in grpo.iter_rows(named=True):
            g = grades.get(r["sample_id"])
            if r["token_advantages"] is None or g is None or not g["steps"]:
                continue
            ids = list(r["completion_token_ids"])
            ref = reference_token_steps(tok, ids, split, g["steps"], r["completion"])
            if ref is None:
                continue
            text, spans = token_spans(tok, ids)
            new = token_step_index(text, spans, g["steps"])
            located, pos = [], 0
            for st in g["steps"]:
                at = r["completion"].find(st, pos)
                at = pos if at < 0 else at
                located.append(at)
                pos = at + len(st)
            offsets, at = [], 0
            for t in ids:  # the old way: each token decoded alone, lengths added up
                offsets.append(at)
                at += len(tok.decode([t]))
            old = [max(0, bisect_right(located, o) - 1) for o in offsets]
            rows += 1
            tokens += len(ids)
            bad = sum(a != b for a, b in zip(old, ref))
            old_wrong += bad
            rows_old_wrong += bad > 0
            new_wrong += sum(a != b for a, b in zip(new, ref))
    print(f"run {args.run_id} ({tok.name_or_path}): {rows} graded rows, {tokens} tokens")
    print(f"  summed single-token decodes (before): {old_wrong} tokens on another step, in {rows_old_wrong} rows")
    print(f"  incremental decoding (now):           {new_wrong} tokens on another step")
    print(f"  ratio before / now: {old_wrong} / {new_wrong}" + ("" if new_wrong else " (now: none)"))


if __name__ == "__main__":
    main()
