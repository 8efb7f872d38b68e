"""Nightly schedules: `guidedrl deploy` against the session's real Prefect server, then a worker runs one."""

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tasks.report.runs import list_runs


async def _runs(deployment: str, state: str | None = None):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType

    async with get_client() as client:
        flow_filter = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[state]))) if state else None
        return await client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])),
                                           flow_run_filter=flow_filter)


def test_deploy_schedules_nightly_runs_and_a_worker_runs_one(tmp_path, cli, prefect_server):
    cfg = tmp_path / "nightly.yaml"
    cfg.write_text(yaml.safe_dump({"problems": {"sources": [{"reasoning_gym": {"task": "chain_sum", "size": 12, "seed": 3}}]},
                                   "prefect": {"retries": 0}}))
    ws = tmp_path / "ws"
    out = cli("deploy", str(cfg), "--work-pool", "test-pool", "--cron", "0 3 * * *", "--workspace", str(ws), "--stages", "curate")
    assert "guidedrl-data/nightly-data" in out.stdout and "guidedrl-training/training" in out.stdout

    deadline = time.time() + 60
    while not (scheduled := asyncio.run(_runs("nightly-data", "SCHEDULED"))):
        if time.time() > deadline:
            from tests import conftest

            raise AssertionError("the scheduler made no runs of the nightly deployment; server log:\n"
                                 + (conftest._HOME / "server.log").read_text()[-4000:])
        time.sleep(1)
    assert all(r.expected_start_time.hour == 3 and r.expected_start_time.minute == 0 for r in scheduled)
    assert asyncio.run(_runs("training", "SCHEDULED")) == []  # on demand only

    from prefect.deployments import run_deployment

    run = run_deployment("guidedrl-data/nightly-data", timeout=0)  # due now
    worker = subprocess.run([sys.executable, "-m", "prefect", "worker", "start", "--pool", "test-pool", "--run-once"],
                            capture_output=True, text=True, timeout=240, env={**os.environ}, cwd=tmp_path)
    done = [r for r in asyncio.run(_runs("nightly-data")) if r.id == run.id]
    assert done and done[0].state.is_completed(), (worker.stdout[-3000:], worker.stderr[-3000:])
    [record] = list_runs(ws)
    assert record.data["command"] == "deployment:data" and record.data["status"] == "completed"
    assert record.data["stages"]["curate"]["status"] == "computed" and Path(record.data["stages"]["curate"]["path"]).is_dir()
