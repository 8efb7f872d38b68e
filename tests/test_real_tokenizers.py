"""The pipeline with tokenizers nobody here wrote: the quickstart's config (every stage: curate to eval, dpo and grpo
included) and two `online` rounds with process rewards, on the GPT-2 byte-level BPE policy (ChatML, a reasoning
block) and the SentencePiece policy (Llama 2's template, its BOS in the text), with Unicode problems among the
sources; `guidedrl runs check` passes on every output. And the char policy's quickstart passes it too."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import ROOT

#: the quickstart's config at test size: every stage, fewer problems, samples and steps
SMALL = ["--set", "rollouts.max_problems=40", "--set", "rollouts.samples_per_problem=4", "--set", "rollouts.shard_size=20",
         "--set", "explain.samples_per_problem=4", "--set", "train.dpo.max_steps=4", "--set", "train.dpo.batch_size=8",
         "--set", "eval.samples_per_problem=2", "--set", "eval.max_problems=24"]


def real_tokenizer_config(tmp_path, model: str):
    """configs/quickstart.yaml with ``model`` as the policy and the Unicode problems (√ π ≤ ≥ × − ½, Cyrillic, CJK) as
    a source whose level the rollouts include."""
    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    config["problems"]["sources"].append({"file": str(ROOT / "data" / "problems" / "unicode_math.jsonl"), "level": "unicode"})
    for source in config["problems"]["sources"]:
        if "file" in source:
            source["file"] = str(ROOT / source["file"])
    config["rollouts"]["levels"] = ["easy", "hard", "unicode"]
    config["policy"]["model"] = str(ROOT / "data" / "models" / model)
    path = tmp_path / f"{model}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def checked(cli, ws, run_id: str) -> dict:
    """`guidedrl runs check --json` of a run: every dataset's counts; it must pass."""
    proc = cli("runs", "check", run_id, "--workspace", str(ws), "--json", check=False)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["failures"] == 0, json.dumps(report, indent=1)
    return {c: sum(d["checked"].get(c, 0) for d in report["datasets"]) for c in ("text", "prompt", "answer", "steps", "sequence", "trl")}


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-gpt2bpe", "tiny-spm"])
def test_every_output_of_a_run_and_two_online_rounds_says_in_text_what_its_ids_say(model, cli, tmp_path):
    from tasks.report.runs import list_runs

    config, ws = real_tokenizer_config(tmp_path, model), tmp_path / "ws"
    cli("run", str(config), "--workspace", str(ws), *SMALL, timeout=1200)
    [run] = list_runs(ws)
    counts = checked(cli, ws, run.run_id)
    assert all(counts[c] > 0 for c in ("text", "prompt", "answer", "sequence", "trl")), counts
    # two online rounds whose update reads the judge's process rewards (every group kept): token advantages on real tokens
    cli("online", str(config), "--rounds", "2", "--workspace", str(ws), *SMALL, "--set", "materialize.reward=judge",
        "--set", "materialize.keep_uniform_groups=true", timeout=1200)
    online = next(r for r in list_runs(ws) if r.run_id != run.run_id)
    assert sum(name.startswith("round-2/") for name in online.data["stages"]) > 0
    counts = checked(cli, ws, online.run_id)
    assert counts["steps"] > 0 and counts["sequence"] > 0, counts


@pytest.mark.slow
def test_the_quickstart_passes_the_alignment_check(finished_quickstart, cli):
    counts = checked(cli, finished_quickstart["workspace"], finished_quickstart["run_id"])
    assert counts["text"] > 0 and counts["sequence"] > 0 and counts["trl"] > 0
