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
        proc.send_signal(signum)  # (the request hangs 600 s: a run that ended did not wait for it)
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"still running 120 s after {signum.name}: {proc.communicate()[0][-3000:]}")
        assert proc.returncode != 0
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


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["SIGTERM", "SIGINT", "completed", "failed"])
def test_nothing_a_run_started_is_left_running_however_it_ends(tmp_path, ending):
    """A `guidedrl run` on a temporary Prefect server (no PREFECT_API_URL, as a new user runs it) that is stopped by
    SIGTERM or SIGINT while a request hangs, completes, or fails (a full disk): afterwards no process of the tree it
    started runs — its temporary Prefect server included (a stop used to leave it behind, re-parented to init)."""
    import psutil

    with OpenAIServer() as server:
        server.behaviour.solve_even = True
        if ending.startswith("SIG"):
            server.behaviour.hang_marker, server.behaviour.hang_seconds = "<|user|>", 600
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90", COLUMNS="200")
        args = _args("rollouts", server.base_url, tmp_path / "ws") + ["--set", "prefect.retries=0"]
        if ending == "failed":
            env["GUIDEDRL_FAULT"] = "store.write.part@rollouts=enospc"
        proc = subprocess.Popen([str(Path(sys.executable).with_name("guidedrl")), *args], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env)
        seen: dict[int, tuple[psutil.Process, str]] = {}  # every process of the run's tree, with its command line
        deadline, sent = time.time() + 300, False
        while proc.poll() is None:
            assert time.time() < deadline, "the run did not end"
            try:
                seen.update((p.pid, (p, _cmdline(p))) for p in psutil.Process(proc.pid).children(recursive=True) if p.pid not in seen)
            except psutil.NoSuchProcess:
                break
            if ending.startswith("SIG") and not sent and any("<|user|>" in str(r) for r in server.behaviour.requests):
                time.sleep(1.0)
                proc.send_signal(getattr(signal, ending))
                sent = True
            time.sleep(0.2)
        out = proc.communicate(timeout=60)[0]
    assert (proc.returncode == 0) == (ending == "completed"), out[-3000:]
    assert any("uvicorn" in cmd and "prefect" in cmd for _, cmd in seen.values()), \
        f"no temporary Prefect server among the run's processes: {[cmd for _, cmd in seen.values()]}"
    time.sleep(1.0)
    left = [cmd for p, cmd in seen.values() if _running(p)]
    assert left == [], f"{ending}: still running after the run ended: {left}"


def _cmdline(p) -> str:
    import psutil

    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def _running(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.mark.slow
def test_a_changed_input_fails_the_stage_that_would_read_it(cli, tmp_path):
    """A byte of a stored rollouts part changed after it was written (a disk fault, a partial copy): `filter`, which
    reads it, refuses in one `error:` line naming the output and how to recompute it, and writes nothing."""
    from tasks.core.store import Store

    ws = tmp_path / "ws"
    common = ["configs/quickstart.yaml", "--workspace", str(ws), "--set", "rollouts.max_problems=4"]
    cli("run", *common, "--stages", "rollouts")
    [out] = Store(ws).outputs("rollouts")
    part = sorted((out.path / "rollouts" / "data").glob("*.parquet"))[0]
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    r = cli("run", *common, "--stages", "filter", check=False)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and len(errors) == 1, r.stdout[-2000:] + r.stderr[-2000:]
    flat = " ".join(r.stderr.split())
    assert f"rollouts output {out.path}: dataset 'rollouts' does not match the fingerprint in its manifest" in flat
    assert "guidedrl rerun RUN_ID --stage rollouts --downstream" in flat
    assert Store(ws).outputs("filter") == []
