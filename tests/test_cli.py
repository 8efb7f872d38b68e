"""End to end through the console script and a real Prefect server."""

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import chain_sum, write_jsonl


def _config(tmp_path: Path) -> Path:
    f = write_jsonl(tmp_path / "mine.jsonl", [
        {"problem": "Ada has 7 apples and buys 5 more. How many apples does she have?", "solution": "12"},
        {"problem": "What is half of 9?", "solution": "4.5"},
        {"problem": "What is half of 9?", "solution": "4.5"},  # duplicate -> rejected
        {"problem": "", "solution": "1"},  # empty -> rejected
    ])
    cfg = {
        "problems": {
            "sources": [
                {"file": str(f), "columns": {"question": "problem", "answer": "solution"}, "level": "word"},
                chain_sum(60, 0, "easy", digits=1),
                {"reasoning_gym": {"task": "basic_arithmetic", "size": 40, "seed": 1, "level": "mixed"}},
            ],
            "eval_fraction": 0.25,
        },
        "prefect": {"retries": 0},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _outputs(ws: Path):
    return sorted(p for p in (ws / "store" / "curate").iterdir() if not p.name.startswith("."))


def test_run_writes_problems_and_rejected_readable_everywhere_then_reuses(tmp_path, cli):
    import datasets
    import polars as pl
    import pyarrow.dataset as pads

    config, ws = _config(tmp_path), tmp_path / "ws"
    first = cli("run", str(config), "--workspace", str(ws), "--stages", "curate")
    assert "computed" in first.stdout
    (out,) = _outputs(ws)
    problems, rejected = out / "problems", out / "rejected"

    df = pl.read_parquet(problems / "data" / "*.parquet")
    assert set(df["split"].unique()) == {"train", "eval"}
    assert set(df["source"].unique()) == {"mine", "reasoning_gym/chain_sum", "reasoning_gym/basic_arithmetic"}
    assert set(df["level"].unique()) == {"word", "easy", "mixed"}
    assert df["problem_id"].n_unique() == df.height
    rej = pads.dataset(str(rejected / "data"), format="parquet").to_table()
    reasons = [r.split(":")[0] for r in rej.column("reason").to_pylist()]
    assert "empty_question" in reasons and "duplicate" in reasons
    hf = datasets.load_dataset("parquet", data_files=str(problems / "data" / "*.parquet"), split="train")
    assert hf.num_rows == df.height and "reference_solution" in hf.column_names
    manifest = json.loads((problems / "manifest.json").read_text())
    assert manifest["num_rows"] == df.height and manifest["summary"]["train"] + manifest["summary"]["eval"] == df.height

    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    second = cli("run", str(config), "--workspace", str(ws), "--stages", "curate")
    assert "nothing was recomputed" in second.stdout
    assert "cached (no work)" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes
    assert _outputs(ws) == [out]

    # a deleted store output is recomputed, never served stale from Prefect's cache
    shutil.rmtree(ws / "store")
    third = cli("run", str(config), "--workspace", str(ws), "--stages", "curate")
    assert "computed" in third.stdout and "nothing was recomputed" not in third.stdout
    assert _outputs(ws)[0].name == out.name
    assert (out / "problems" / "manifest.json").exists()

    # a changed input file changes the key: new output, old one kept
    with open(tmp_path / "mine.jsonl", "a") as fh:
        fh.write(json.dumps({"problem": "What is 10 - 4?", "solution": "6"}) + "\n")
    cli("run", str(config), "--workspace", str(ws), "--stages", "curate")
    assert len(_outputs(ws)) == 2

    ls = cli("datasets", "ls", "--workspace", str(ws))
    assert "problems" in ls.stdout and "rejected" in ls.stdout and out.name in ls.stdout
    # at 100 columns the path — what `datasets show` and `publish` take — is whole, relative to where you are, and works
    import os
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("guidedrl")
    narrow = subprocess.run([str(exe), "datasets", "ls", "--workspace", "ws"], cwd=ws.parent, capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "100"})
    entries = json.loads(cli("datasets", "ls", "--workspace", str(ws), "--json").stdout)
    copied = [str(Path(e["path"]).relative_to(ws.parent)) for e in entries]
    assert narrow.returncode == 0 and all(c in narrow.stdout for c in copied), narrow.stdout  # each on one line, whole
    assert "…" not in narrow.stdout and max(map(len, narrow.stdout.splitlines())) <= 100
    assert "(verified)" in cli("datasets", "show", copied[0], cwd=ws.parent).stdout
    show = cli("datasets", "show", str(problems))
    assert "problem_id: string (not null)" in show.stdout and "(verified)" in show.stdout
    assert f"{df.height} rows" in show.stdout


def test_run_errors_are_one_clear_line(tmp_path, cli):
    bad = tmp_path / "bad.yaml"
    bad.write_text("problems:\n  sources:\n    - file: nope.jsonl\n  eval_frac: 0.1\n")
    r = cli("run", str(bad), "--workspace", str(tmp_path / "ws"), check=False)
    assert r.returncode != 0 and "problems.eval_frac: unknown key" in r.stderr
    assert f"{bad}: invalid config" in " ".join(r.stderr.split())  # the config file, not "<config>"
    missing = tmp_path / "missing.yaml"
    missing.write_text("problems:\n  sources:\n    - file: nope.jsonl\n")
    r = cli("run", str(missing), "--workspace", str(tmp_path / "ws"), check=False, cwd=tmp_path)
    assert r.returncode != 0 and "nope.jsonl: problem file not found" in r.stderr
    r = cli("run", str(missing), "--stages", "curate,bogus", check=False, cwd=tmp_path)
    assert r.returncode != 0 and "unknown stage(s) ['bogus']" in r.stderr


def test_config_show_resolves_defaults_and_masks(tmp_path, cli, monkeypatch):
    config = _config(tmp_path)
    r = cli("config", "show", str(config), "--set", "problems.split_seed=3")
    shown = yaml.safe_load(r.stdout)
    assert shown["problems"]["split_seed"] == 3 and shown["problems"]["decontamination"]["ngram"] == 8
    assert shown["workspace"] == "./workspace"


def test_help_explains_commands(cli):
    r = cli("--help")
    for word in ("quickstart", "run", "config", "datasets"):
        assert word in r.stdout
    assert "--set" in cli("run", "--help").stdout


@pytest.mark.slow
def test_quickstart_runs_and_names_the_stages_still_to_come(finished_quickstart, cli):
    ws, stdout = finished_quickstart["workspace"], finished_quickstart["stdout"]
    for stage in ("curate", "rollouts", "filter", "explain", "hint", "rubric", "grade", "materialize", "dpo", "grpo", "eval"):
        assert any(p for p in (ws / "store" / stage).iterdir() if not p.name.startswith("."))
    assert "pass rates of the policy's rollouts" in stdout and "pass@8" in stdout
    said = " ".join(stdout.split())  # the quickstart combines the three papers: the newer guidance is left out
    assert "Every stage of the pipeline ran but prefix, self_hint, which no update of this run reads" in said, said[-3000:]
    assert "before/after training" in stdout and "dpo  pass@1 / pass@8" in stdout and "grpo  pass@1" in stdout
    assert "online GRPO round:" in stdout
    assert "ExPO explained" in stdout and "LTE unlocked" in stdout
    assert "judge: rule, process mode" in stdout and "parse rate" in stdout

    # the LLM judge's dry run counts what grading would send, sends nothing
    from tests.openai_server import OpenAIServer

    with OpenAIServer() as srv:
        cfg = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
        args = ("run", cfg, "--workspace", str(ws), "--stages", "grade", "--dry-run",
                "--set", "judge.backend=openai", "--set", f"judge.base_url={srv.base_url}", "--set", "judge.model=m")
        d = " ".join(cli(*args, "--set", "judge.max_requests=100").stdout.split())
        assert re.search(r"grade: would send 1920 requests to http://127\.0\.0\.1:\d+/v1 \(m\) \(0 answers already cached\), "
                         r"about [\d,]+ prompt tokens and at most 3,932,160 completion tokens — over judge.max_requests = 100", d), d
        assert "rubric: 0 requests to send (judge.rubric is off" in d and "nothing was sent" in d
        assert srv.behaviour.requests == []


@pytest.mark.slow
def test_quickstart_rows_are_those_of_the_recorded_run(finished_quickstart):
    """The quickstart's outputs, row for row, are the ones recorded in tests/quickstart_rows.json (made with
    `python -m tests.golden WORKSPACE`): a refactoring must not change them. A change that does on purpose
    re-makes the file and says why in its commit."""
    import json

    from tests.golden import differences, row_digests

    recorded = json.loads((Path(__file__).parent / "quickstart_rows.json").read_text())
    changed = differences(row_digests(finished_quickstart["workspace"]), recorded)
    assert not changed, f"quickstart rows changed: {changed}"


def test_golden_rows_tell_a_changed_float_from_another_machines_last_bits():
    from tests.golden import differences

    rec = {"rollouts/rollouts": {"rows": 2, "sha256": "ab", "float_sums": {"behaviour_logprobs": ["-13661.5605", "13661.5605"]}}}
    noise = {"rollouts/rollouts": {**rec["rollouts/rollouts"], "float_sums": {"behaviour_logprobs": ["-13661.5600", "13661.5600"]}}}
    moved = {"rollouts/rollouts": {**rec["rollouts/rollouts"], "float_sums": {"behaviour_logprobs": ["-13661.51", "13661.51"]}}}
    text = {"rollouts/rollouts": {**rec["rollouts/rollouts"], "sha256": "cd"}}
    assert differences(noise, rec) == {}  # 4e-8 of the sum: float32 rounding on another CPU
    hint = {"hint/hints": {"rows": 1, "sha256": "ab", "float_sums": {"behaviour_logprobs": ["-2.976799310958313", "2.976799310958313"]}}}
    hint_noise = {"hint/hints": {**hint["hint/hints"], "float_sums": {"behaviour_logprobs": ["-2.9768023526578418", "2.9768023526578418"]}}}
    hint_moved = {"hint/hints": {**hint["hint/hints"], "float_sums": {"behaviour_logprobs": ["-2.9769", "2.9769"]}}}
    assert differences(hint_noise, hint) == {} and list(differences(hint_moved, hint)) == ["hint/hints"]  # one row of 14 tokens
    assert list(differences(moved, rec)) == list(differences(text, rec)) == ["rollouts/rollouts"]
    assert differences({}, rec) == {"datasets": (["rollouts/rollouts"], [])}


@pytest.mark.parametrize("width", [80, 120])
@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "file"])
def test_the_stage_table_is_one_line_a_stage_and_every_output_path_whole(monkeypatch, tmp_path, width, terminal):
    """At 80 columns (a small terminal, or any log file: rich falls back to 80 there) and at 120: one table line per
    stage, none wider than the screen; below it each output path whole on one line, and the full result."""
    import io

    from rich.console import Console

    from flows.cli import render
    from tasks.registry import REGISTRY, STAGES

    buf = io.StringIO()
    monkeypatch.setattr(render, "console", Console(file=buf, width=width, force_terminal=terminal, color_system=None))
    workspace = tmp_path / ("a-long-workspace-name-" * 3)  # an absolute --workspace: the path that made 1,184 lines
    results = {s: {"status": "reused" if i % 2 else "computed", "path": str(workspace / "store" / s / ("0123456789" * 2)),
                   "summary": {}} for i, s in enumerate(STAGES)}
    render.print_results(results)
    lines = buf.getvalue().splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith("curate -> "))
    table = lines[:end]
    assert max(map(len, table)) <= width
    for stage in STAGES:
        rows = [line for line in table if line.strip("│┃ ").startswith(stage + " ")]
        assert len(rows) == 1, (stage, table)
        assert f"{stage} -> {results[stage]['path']}" in lines  # the whole path, one line, copyable
        assert f"  {REGISTRY[stage].describe({})}" in lines  # and the whole result
    assert len(table) == len(STAGES) + 5  # title, top, header, rule, one line a stage, bottom


def test_a_librarys_future_warning_never_reaches_the_users_output():
    """transformers' FutureWarning that TRL's DPOTrainer set off in every dpo stage (gradient_checkpointing_enable is
    deprecated) is kept out; a FutureWarning from anywhere else still shows."""
    import warnings

    from transformers import AutoModelForCausalLM

    from flows.errors import quiet_library_warnings
    from tests.test_training import TINY

    model = AutoModelForCausalLM.from_pretrained(TINY)
    with warnings.catch_warnings(record=True) as before:
        warnings.simplefilter("default")
        model.gradient_checkpointing_enable()
    assert any(issubclass(w.category, FutureWarning) and "gradient_checkpointing" in str(w.message) for w in before)
    with warnings.catch_warnings(record=True) as after:
        warnings.simplefilter("default")
        quiet_library_warnings()
        model.gradient_checkpointing_enable()
        warnings.warn("ours", FutureWarning)
    assert [str(w.message) for w in after] == ["ours"]
