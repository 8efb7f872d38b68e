"""Nightly schedules: `guidedrl deploy` against the session's real Prefect server, then a worker runs one."""

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tasks.report.runs import list_runs
from tests.conftest import chain_sum

pytestmark = pytest.mark.slow  # end to end: Prefect deployments run by workers


async def _runs(deployment: str, state: str | None = None):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType

    async with get_client() as client:
        flow_filter = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[state]))) if state else None
        return await client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])),
                                           flow_run_filter=flow_filter)


def test_deploy_schedules_nightly_runs_and_a_worker_runs_one(tmp_path, cli, prefect_server):
    cfg = tmp_path / "nightly.yaml"
    cfg.write_text(yaml.safe_dump({"problems": {"sources": [chain_sum(12, 3, terms=None)]},
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


def test_a_worker_elsewhere_runs_both_deployments_over_the_shared_workspace(tmp_path, cli, prefect_server):
    """Deployed from one directory with relative paths; a worker started from another directory with another HOME
    (what a second machine sharing the file system sees) runs the nightly data and the training deployments: what
    was deployed is absolute, and both runs' outputs land in the one shared store."""
    deployer, machine, home = tmp_path / "deployer", tmp_path / "worker-machine", tmp_path / "worker-home"
    for d in (deployer, machine, home):
        d.mkdir()
    tiny = Path(__file__).resolve().parents[1] / "data" / "models" / "tiny-policy"
    (deployer / "nightly.yaml").write_text(yaml.safe_dump({
        "problems": {"sources": [chain_sum(16, 4, digits=1)],
                     "eval_fraction": 0.25},
        "policy": {"model": str(tiny)}, "prompts": {"plain": "tiny_plain"},
        "eval": {"samples_per_problem": 2, "max_new_tokens": 16}, "prefect": {"retries": 0}}))
    cli("deploy", "nightly.yaml", "--work-pool", "elsewhere-pool", "--cron", "0 4 * * *", "--workspace", "ws", "--stages", "curate",
        cwd=deployer)
    from prefect.deployments import run_deployment

    env = {**os.environ, "HOME": str(home)}
    worker = [sys.executable, "-m", "prefect", "worker", "start", "--pool", "elsewhere-pool", "--run-once"]
    for name, params in (("guidedrl-data/nightly-data", {}), ("guidedrl-training/training", {"stages": ["eval"]})):
        run = run_deployment(name, parameters=params, timeout=0)
        assert Path(run.parameters["config_path"]).is_absolute() and Path(run.parameters["workspace"]).is_absolute()
        proc = subprocess.run(worker, capture_output=True, text=True, timeout=300, env=env, cwd=machine)
        done = [r for r in asyncio.run(_runs(name.split("/")[1])) if r.id == run.id]
        assert done and done[0].state.is_completed(), (proc.stdout[-3000:], proc.stderr[-3000:])
    records = {r.data["command"]: r for r in list_runs(deployer / "ws")}
    assert set(records) == {"deployment:data", "deployment:training"}
    assert records["deployment:data"].data["stages"]["curate"]["status"] == "computed"
    assert records["deployment:training"].data["stages"]["curate"]["status"] in ("reused", "cached")  # the shared store's
    assert records["deployment:training"].data["stages"]["eval"]["status"] == "computed"
    assert all(Path(p).resolve().is_relative_to((deployer / "ws").resolve()) for r in records.values() for p in r.outputs())
    assert not (machine / "ws").exists() and not any(machine.iterdir())  # nothing written where the worker was started
