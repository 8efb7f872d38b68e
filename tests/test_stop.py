"""Stopping means stopping: SIGTERM or SIGINT during a stage that waits on a server that never answers ends
`guidedrl run` within 15 s, records the run `interrupted`, and the next run (the server answering again)
ends with the rows of an uninterrupted run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.openai_server import OpenAIServer

TINY = ROOT / "data" / "models" / "tiny-policy"


def _args(stage: str, url: str, ws: Path) -> list[str]:
    common = ["run", "configs/quickstart.yaml", "--stages", stage, "--workspace", str(ws), "--set", "rollouts.max_problems=8",
              "--set", "rollouts.shard_size=4"]
    if stage == "rollouts":  # the policy served: its sampling requests hang
        return common + ["--set", "policy.backend=openai", "--set", f"policy.base_url={url}", "--set", "policy.model=tiny",
                         "--set", f"policy.tokenizer={TINY}", "--set", f"policy.checkpoint={TINY}", "--set", "policy.timeout_seconds=300"]
    return common + ["--set", "judge.backend=openai", "--set", f"judge.base_url={url}", "--set", "judge.model=judge",  # the judge hangs
                     "--set", "judge.mode=outcome", "--set", "judge.timeout_seconds=300"]


def _cli(args: list[str]) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("guidedrl")
    return subprocess.Popen([str(exe), *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "200"})


def _rows(ws: Path, stage: str):
    from tasks.core.store import Store

    [out] = Store(ws).outputs(stage)
    dataset = "rollouts" if stage == "rollouts" else "grades"
    df = out.scan(dataset).collect()
    return df.sort(df.columns[0]).to_dicts()


@pytest.mark.slow
@pytest.mark.parametrize("stage,signum", [("rollouts", signal.SIGTERM), ("rollouts", signal.SIGINT), ("grade", signal.SIGTERM),
                                          ("grade", signal.SIGINT)], ids=["rollouts-SIGTERM", "rollouts-SIGINT", "grade-SIGTERM", "grade-SIGINT"])
def test_a_signal_during_a_hung_request_ends_the_run_and_the_rerun_resumes(prefect_server, tmp_path, stage, signum):
    from tasks.report.runs import list_runs

    marker = "<|user|>" if stage == "rollouts" else "reference_solution"  # in every sampling / judge request, not in the probe
    with OpenAIServer() as server:
        server.behaviour.hang_marker, server.behaviour.hang_seconds = marker, 600
        if stage == "rollouts":
            server.behaviour.solve_even = True
        ws = tmp_path / "ws"
        proc = _cli(_args(stage, server.base_url, ws))
        deadline = time.time() + 240
        while not any(marker in str(r) for r in server.behaviour.requests):  # a request of the stage is in flight
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "no request"
            time.sleep(0.3)
        time.sleep(1.0)
        sent = time.time()
        proc.send_signal(signum)
        try:
            out, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"still running 15 s after {signum.name}: {proc.communicate()[0][-3000:]}")
        assert time.time() - sent < 15 and proc.returncode != 0
        [record] = list_runs(ws)
        assert record.status == "interrupted", (record.data, out[-2000:])
        assert record.data["stages"][stage]["status"] == "interrupted"
        assert "interrupted" in out

        server.behaviour.hang_marker = None  # the server answers again: the re-run completes
        again = _cli(_args(stage, server.base_url, ws))
        out2, _ = again.communicate(timeout=600)
        assert again.returncode == 0, out2[-3000:]
        fresh = tmp_path / "fresh"  # an uninterrupted run of the same config
        if stage == "grade":  # grading the same rollouts: the comparison is of grading, not of two samplings
            for upstream in ("curate", "rollouts"):
                shutil.copytree(ws / "store" / upstream, fresh / "store" / upstream, ignore=shutil.ignore_patterns(".lock-*"))
        third = _cli(_args(stage, server.base_url, fresh))
        out3, _ = third.communicate(timeout=600)
        assert third.returncode == 0, out3[-3000:]
    assert _rows(ws, stage) == _rows(fresh, stage)
