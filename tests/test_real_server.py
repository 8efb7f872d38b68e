"""The policy and the judge served by a real server nobody here wrote: `transformers serve` with the tiny
policy (text only: no token ids, no log-probabilities, one choice per request). The vLLM-like server of
tests/openai_server.py stays for what only vLLM offers (token ids, prompt_logprobs, LoRA loading)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.real_servers import TransformersServe, free_port

pytestmark = pytest.mark.slow  # end to end: `transformers serve` started as a subprocess

TINY = ROOT / "data" / "models" / "tiny-policy"


@pytest.fixture(scope="module")
def tserve():
    with TransformersServe(TINY) as server:
        yield server


def _served(server_url: str, model: str) -> list[str]:
    return ["--set", "policy.backend=openai", "--set", f"policy.base_url={server_url}", "--set", f"policy.model={model}",
            "--set", f"policy.tokenizer={TINY}", "--set", f"policy.checkpoint={TINY}", "--set", "policy.concurrency=4"]


SMALL = ["--set", "rollouts.max_problems=24", "--set", "rollouts.shard_size=12", "--set", "explain.samples_per_problem=4",
         "--set", "train.grpo.batch_size=32"]


def _only(ws: Path, stage: str):
    from tasks.core.store import Store

    [out] = Store(ws).outputs(stage)
    return out


def test_text_only_server_runs_the_pipeline_to_the_update(tserve, cli, tmp_path):
    """The quickstart config, small, through `--stages grpo` with the policy served by `transformers serve`: no errored
    row, token ids on every row (re-tokenized, each decodes back to its text), the easy level solved about as in
    process, and the update trains on π_old recomputed by the trainer — which equals a forward pass of the same rows."""
    ws = tmp_path / "ws"
    # uniform groups kept (advantage 0): the update has plain rows whatever the server samples (`transformers serve`
    # does not reproduce a seeded request, and 24 problems can all come out uniform)
    proc = cli("run", "configs/quickstart.yaml", "--stages", "grpo", "--workspace", str(ws), *_served(tserve.url, tserve.model), *SMALL,
               "--set", "materialize.keep_uniform_groups=true", timeout=900)
    rollouts = _only(ws, "rollouts")
    df = rollouts.scan("rollouts").collect()
    assert df.height == 24 * 8 and (df["finish_reason"] != "error").all()
    assert set(df["token_source"]) == {"tokenizer"} and (df["completion_token_ids"].list.len() > 0).all()
    assert df["behaviour_logprobs"].null_count() == df.height  # the server gave none
    s = rollouts.summary
    assert s["server"]["kind"] == "generic" and "token ids (the policy's tokenizer)" in s["server"]["computed"]
    assert s["pass"]["easy"]["pass@1"] > 0.5 and s["errors"] == 0  # the tiny policy solves the easy level in process too
    assert "guidedrl computed token ids" in proc.stdout.replace("\n", " ") or "computed token ids" in proc.stdout
    grpo = _only(ws, "grpo").summary
    assert grpo["old_logprobs"] == "recompute" and grpo["steps"] >= 1 and grpo["rows_by_kind"]["plain"] > 0
    assert grpo["mismatch"]["tokens"] == 0  # nothing to compare: the server gave no log-probs

    # the trainer's π_old of these rows equals an in-process forward pass of them (the local checkpoint's score)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.models.transformers_backend import TransformersBackend
    from tasks.stages._grpo_loop import recompute_old
    from tasks.stages.grpo import GRPOTrainConfig

    tok = AutoTokenizer.from_pretrained(TINY)
    model = AutoModelForCausalLM.from_pretrained(TINY).eval()
    rows = df.head(16).select("loss_prompt", "completion_token_ids", "temperature").to_dicts()
    rows = [{**r, "advantage": 1.0, "behaviour_logprobs": None, "token_advantages": None, "is_guided": False, "prompt_kind": "plain",
             "sample_id": str(i)} for i, r in enumerate(rows)]
    recompute_old(model, tok, rows, GRPOTrainConfig(), "cpu", "float32")
    scored = TransformersBackend.from_objects(model, tok, "p").score([r["loss_prompt"] for r in rows],
                                                                    [r["completion_token_ids"] for r in rows], rows[0]["temperature"])
    for r, want in zip(rows, scored):
        assert r["old_logprobs"].tolist() == pytest.approx(want, abs=1e-4)


def test_the_llm_judge_path_against_transformers_serve(tserve, cli, tmp_path):
    """rubric and grade with judge.backend openai at the same server: requests go through the real client and come
    back (the tiny policy is no judge: its replies do not parse, every trace is masked and the summary says so)."""
    ws = tmp_path / "ws"
    cli("run", "configs/quickstart.yaml", "--stages", "grade", "--workspace", str(ws), "--set", "rollouts.max_problems=3",
        "--set", "rollouts.samples_per_problem=2", "--set", "judge.backend=openai", "--set", f"judge.base_url={tserve.url}",
        "--set", f"judge.model={tserve.model}", "--set", "judge.rubric=true", "--set", "judge.mode=outcome",
        "--set", "judge.max_tokens=24", "--set", "judge.max_retries=0", "--set", "judge.max_failed_fraction=1.0", timeout=900)
    grade, rubric = _only(ws, "grade").summary, _only(ws, "rubric").summary
    assert rubric["judge_requests"]["requests"] >= 3 and rubric["judge_requests"]["failed"] == 0  # answered (200), each reminded once
    assert rubric["problems_without_rubric"] == 3
    assert grade["traces"] == 6 and grade["judge_requests"]["requests"] >= 6 and grade["judge_requests"]["failed"] == 0
    assert grade["graded"] == 0 and grade["parse_rate"] == 0.0  # every trace masked, and the summary says why
    assert grade["not_graded_by_reason"] == {"unparseable judge answer (also after a reminder of the format)": 6}


def test_a_stopped_server_is_one_error_line_before_any_work(cli, tmp_path):
    ws = tmp_path / "ws"
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    proc = cli("run", "configs/quickstart.yaml", "--stages", "rollouts", "--workspace", str(ws), *_served(url, "m"), check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() + proc.stdout.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and url in lines[0] and "not reachable" in lines[0], proc.stdout + proc.stderr
    assert not (ws / "store" / "rollouts").exists() or not any((ws / "store" / "rollouts").iterdir())


def test_a_field_the_server_refuses_names_it_and_the_setting(tserve, cli, tmp_path):
    """`policy.server: vllm` at a server that is not vLLM: its 422 on `return_tokens_as_token_ids` is one error line
    that names the field and `policy.server`; with `auto` the same server is used, the field not sent."""
    from tasks.models.served import ServerError, probe

    proc = cli("run", "configs/quickstart.yaml", "--stages", "rollouts", "--workspace", str(tmp_path / "ws"),
               *_served(tserve.url, tserve.model), "--set", "policy.server=vllm", check=False)
    err = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(err) == 1
    assert "return_tokens_as_token_ids" in err[0] and "policy.server" in err[0]
    caps = probe(tserve.url, tserve.model, server="auto")
    assert "return_tokens_as_token_ids" not in caps.fields and not caps.n and not caps.token_ids
    with pytest.raises(ServerError, match="does not serve model 'other'"):
        probe(tserve.url, "other")


def test_the_segment_protocol_against_transformers_serve(tserve, cli, tmp_path):
    """ExpRL's segment protocol through the real client at a real server: one request per step is sent and answered;
    the tiny policy's replies do not parse, so each trace is masked by its first step, and the summary says so."""
    ws = tmp_path / "ws"
    cli("run", "configs/quickstart.yaml", "--stages", "grade", "--workspace", str(ws), "--set", "rollouts.max_problems=2",
        "--set", "rollouts.samples_per_problem=2", "--set", "judge.backend=openai", "--set", f"judge.base_url={tserve.url}",
        "--set", f"judge.model={tserve.model}", "--set", "judge.mode=process", "--set", "judge.process_protocol=segment",
        "--set", "judge.max_tokens=24", "--set", "judge.max_retries=0", "--set", "judge.max_failed_fraction=1.0", timeout=900)
    grade = _only(ws, "grade")
    rows = grade.read("grades").to_pylist()
    steps = sum(len(r["steps"]) for r in rows)
    assert len(rows) == 4 and steps > len(rows) and grade.summary["judge_requests"]["failed"] == 0
    assert grade.summary["judge_requests"]["requests"] >= steps  # one per step (plus format reminders)
    assert grade.summary["graded"] == 0 and all(r["error"].startswith("step ") and "unparseable" in r["error"] for r in rows)


def test_a_served_byte_level_bpe_policy_through_the_update_passes_the_alignment_check(cli, tmp_path):
    """`transformers serve` with the GPT-2 BPE policy (ChatML, a reasoning block, two stop ids) through `--stages grpo`:
    the server's text re-tokenized, every row's ids decode to its text, the update's sequences are the sampler's
    prompt ids and those ids (`guidedrl runs check`)."""
    import json

    from tasks.report.runs import list_runs

    bpe = ROOT / "data" / "models" / "tiny-gpt2bpe"
    ws = tmp_path / "ws"
    with TransformersServe(bpe) as server:
        served = [a.replace(str(TINY), str(bpe)) for a in _served(server.url, server.model)]
        cli("run", "configs/quickstart.yaml", "--stages", "grpo", "--workspace", str(ws), *served, *SMALL,
            "--set", "rollouts.samples_per_problem=4", "--set", "materialize.keep_uniform_groups=true", timeout=900)
    df = _only(ws, "rollouts").scan("rollouts").collect()
    assert (df["finish_reason"] != "error").all() and set(df["token_source"]) == {"tokenizer"}
    assert df["completion"].str.starts_with("<think>").mean() > 0.9  # the policy's reasoning block came through the server
    [run] = list_runs(ws)
    proc = cli("runs", "check", run.run_id, "--workspace", str(ws), "--json", check=False)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["failures"] == 0, proc.stdout
    checked = {c: sum(d["checked"].get(c, 0) for d in report["datasets"]) for c in ("text", "prompt", "sequence")}
    assert checked["text"] >= df.height and checked["sequence"] > 0, checked  # rollouts, and explanations and hints
