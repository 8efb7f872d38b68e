"""API keys come only from the environment and go nowhere else.

A run with the openai policy backend (rollouts) and an LLM judge (rubric), each with
a recognisable fake key in its environment variable, against the local
OpenAI-compatible server: the server received both keys (they were used), and
neither appears in any file of the workspace (stage outputs, manifests, run
records, the report, the judge cache), in the command's output, in any file under
PREFECT_HOME (persisted task results), or in what Prefect's API holds about the
runs (flow-run parameters, task runs, logs).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import yaml

from tests.openai_server import OpenAIServer
from tests.conftest import chain_sum

ROOT = Path(__file__).resolve().parents[1]
POLICY_KEY = "sk-guidedrl-POLICY-4e1c9a0b7d2f"
JUDGE_KEY = "sk-guidedrl-JUDGE-93b5f0c2a6e8"


def _files_with(root: Path, secrets: list[str]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{path}: {s[:16]}..." for s in secrets if s.encode() in data]
    return hits


async def _prefect_records(flow_run_ids: list[str]) -> str:
    """What the Prefect server holds about these flow runs, as one JSON text."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    async with get_client() as client:
        runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids)))
        tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids)))
        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=flow_run_ids)))
    assert runs and tasks and logs  # there is something to search
    return json.dumps([r.model_dump(mode="json") for r in runs] + [t.model_dump(mode="json") for t in tasks]
                      + [entry.model_dump(mode="json") for entry in logs])


def test_api_keys_reach_the_servers_and_nothing_else(cli, tmp_path, random_checkpoint):
    from prefect.client.orchestration import get_client

    with OpenAIServer() as server:
        cfg = {
            "workspace": "./ws",
            "problems": {"sources": [chain_sum(12, 3, "easy", terms=None)], "eval_fraction": 0.0},
            "policy": {"backend": "openai", "model": "served", "base_url": server.base_url, "tokenizer": str(random_checkpoint),
                       "api_key_env": "GUIDEDRL_TEST_POLICY_KEY", "max_retries": 0},
            "prompts": {"plain": "tiny_plain"},
            "rollouts": {"samples_per_problem": 2, "max_new_tokens": 3},
            "judge": {"backend": "openai", "rubric": True, "model": "judge", "base_url": server.base_url,
                      "api_key_env": "GUIDEDRL_TEST_JUDGE_KEY", "max_retries": 0},
        }
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
        os.environ.update({"GUIDEDRL_TEST_POLICY_KEY": POLICY_KEY, "GUIDEDRL_TEST_JUDGE_KEY": JUDGE_KEY})
        try:
            proc = cli("run", "config.yaml", "--stages", "curate,rollouts,rubric", cwd=tmp_path)
        finally:
            for k in ("GUIDEDRL_TEST_POLICY_KEY", "GUIDEDRL_TEST_JUDGE_KEY"):
                os.environ.pop(k)
        assert {f"Bearer {POLICY_KEY}", f"Bearer {JUDGE_KEY}"} <= server.behaviour.authorization
    secrets = [POLICY_KEY, JUDGE_KEY]
    for s in secrets:
        assert s not in proc.stdout + proc.stderr
    assert _files_with(tmp_path / "ws", secrets) == []
    assert _files_with(Path(os.environ["PREFECT_HOME"]), secrets) == []

    record = next((tmp_path / "ws" / "runs").glob("*/run.json"))
    assert json.loads(record.read_text())["config"]["policy"]["api_key_env"] == "GUIDEDRL_TEST_POLICY_KEY"  # the name is kept

    async def flow_runs_of_this_test() -> list[str]:
        async with get_client() as client:
            runs = await client.read_flow_runs(limit=200)
        return [str(r.id) for r in runs if r.parameters.get("workspace") == str((tmp_path / "ws").resolve())]

    ids = asyncio.run(flow_runs_of_this_test())
    assert ids
    held = asyncio.run(_prefect_records(ids))
    assert "GUIDEDRL_TEST_JUDGE_KEY" in held  # the parameters are there, with the variable's name
    for s in secrets:
        assert s not in held
