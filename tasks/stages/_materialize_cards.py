"""The dataset cards of the stage `materialize`: what each dataset is, every column's meaning, its statistics, how it
was made and how to load it without guidedrl. Not a stage (its name starts with an underscore)."""

from __future__ import annotations

import json

from tasks.core.schemas import SCHEMAS


_MEANING = {
    "prompt": "the original question prompt as the policy saw it (chat template applied); never the guided one",
    "chosen": "the preferred completion", "rejected": "the dispreferred completion (the policy's own wrong sample)",
    "problem_id": "stable hash of the normalised question (joins to the problems dataset)",
    "chosen_kind": "where the chosen completion came from: plain | explain (ExPO) | hint (LTE)",
    "rejected_kind": "where the rejected completion came from",
    "sample_id": "the sample's id (joins to rollouts, grades)", "group_id": "the GRPO group (one problem)",
    "loss_prompt": "the prompt the loss conditions on: the original question prompt, except for prefix and self-hint samples "
                   "with `loss: guided`, trained under the prompt they were shown (prompt_kind prefix / self_hint)",
    "completion_token_ids": "the completion's token ids",
    "reward": "verified answer (1/0) or the judge's outcome score; null when the grade did not parse (masked)",
    "advantage": "group-normalised reward; null for explanation rows and masked samples",
    "token_advantages": "process mode: per token, its step's advantage s_t - s_(t-1) (first step s_1 - s_T)",
    "behaviour_logprobs": "per token, under the prompt the sampling policy was shown",
    "loss_logprobs": "per token, under loss_prompt (differs from behaviour_logprobs for guided samples)",
    "temperature": "the sampling temperature both log-probability columns are at; the policy update scores tokens at it",
    "is_guided": "sampled with guidance (answer shown or hint) but trained under the original prompt",
    "prompt_kind": "plain | explain | hint | prefix | self_hint", "completion": "the completion text",
}


def dataset_card(name: str, kind: str, num_rows: int, summary: dict, inputs: dict, stage_cfg: dict, columns: list[str]) -> str:
    schema = SCHEMAS[kind]
    lines = [f"# guidedrl `{name}` dataset", "", {
        "dpo": "Preference pairs for offline DPO: one prompt, a chosen and a rejected completion.",
        "grpo": "Per-sample rows of GRPO groups, with rewards, group-normalised advantages and the log-probabilities "
                "the policy update needs (guided samples carry both the behaviour and the loss-side log-probabilities).",
        "sft": "Verified correct samples and selected self-explanations, each under the original prompt.",
    }[name], "", f"Rows: {num_rows}.", "", "## Columns", "", "| column | type | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{f.name}` | {f.type} | {_MEANING.get(f.name, '')} |" for f in schema]
    lines += [f"| `{k}` | (extra) | {_MEANING.get(k, '')} |" for k in columns if schema.get_field_index(k) < 0]
    lines += ["", "## Statistics", "", "```json", json.dumps(summary, indent=2), "```", "",
              "## How it was made", "", "Stage `materialize` of guidedrl from these inputs (content fingerprints):", "",
              "```json", json.dumps(inputs, indent=2), "```", "", "with this configuration:", "", "```json",
              json.dumps(stage_cfg, indent=2), "```", "", "`manifest.json` beside this card has the same and the file fingerprint.", "",
              "## How to load it (guidedrl not needed)", "", "```python",
              'import polars as pl; df = pl.read_parquet("DIR/data/*.parquet")',
              'import pyarrow.dataset as ds; table = ds.dataset("DIR/data", format="parquet").to_table()',
              'from datasets import load_dataset; d = load_dataset("parquet", data_files="DIR/data/*.parquet")["train"]',
              "```", ""]
    return "\n".join(lines)
