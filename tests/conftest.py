"""Test session set-up: offline, a temporary PREFECT_HOME, and one real Prefect
server for the whole session that in-process flows and CLI subprocesses share."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_HOME = Path(tempfile.mkdtemp(prefix="guidedrl-test-prefect-"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PORT = _free_port()
os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": str(_HOME),
        "PREFECT_API_URL": f"http://127.0.0.1:{_PORT}/api",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "guidedrl",
        "GUIDEDRL_PROGRESS": "0",
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
        "HF_DATASETS_CACHE": str(_HOME / "hf-datasets-cache"),
        # the session server's scheduler and the test workers poll every second or two (tests/test_deploy.py)
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "1",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "5",
    }
)


@pytest.fixture(scope="session")
def prefect_server():
    """A real `prefect server start` on loopback for the whole session."""
    log = open(_HOME / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(_PORT)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PREFECT_API_URL": ""},
    )
    url = os.environ["PREFECT_API_URL"] + "/health"
    deadline = time.time() + 90
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"Prefect server did not start: {(_HOME / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield os.environ["PREFECT_API_URL"]
    try:  # send buffered run logs while the server is still up
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
    except Exception:
        pass
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _cli(*args: str, cwd: Path | None = None, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("guidedrl")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "flows.cli"]
    proc = subprocess.run(
        cmd + list(args), cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"guidedrl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def cli(prefect_server):
    """Run the `guidedrl` console script in a subprocess against the session server."""
    return _cli


@pytest.fixture(scope="session")
def finished_quickstart(prefect_server, tmp_path_factory):
    """`guidedrl quickstart` run once per test session: its workspace, run id and output.
    Tests that change the workspace work on a copy."""
    from tasks.report.runs import list_runs

    cwd = tmp_path_factory.mktemp("quickstart")
    proc = _cli("quickstart", "--workspace", str(cwd / "ws"), cwd=cwd, timeout=900)
    [record] = list_runs(cwd / "ws")
    return {"workspace": cwd / "ws", "run_id": record.run_id, "stdout": proc.stdout, "cwd": cwd}


def write_jsonl(path: Path, rows: list) -> Path:
    import json

    with open(path, "w") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory):
    """A random (untrained) tiny Llama + character tokenizer saved to disk: fast to sample from."""
    from tasks.models.tiny_policy import TinyPolicyConfig, build_model, build_tokenizer

    path = tmp_path_factory.mktemp("random-policy")
    tok = build_tokenizer()
    model = build_model(TinyPolicyConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, seed=1), tok)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def chain_sum(size: int, seed: int, level: str | None = None, terms: int | None = 2, digits: int | None = None, **config) -> dict:
    """A `problems.sources` entry: reasoning-gym's chain_sum, ``terms`` terms of ``digits`` digits (None: its default)."""
    cfg = {**({"min_terms": terms, "max_terms": terms} if terms else {}),
           **({"min_digits": digits, "max_digits": digits} if digits else {}), **config}
    return {"reasoning_gym": {"task": "chain_sum", "size": size, "seed": seed, **({"level": level} if level else {}),
                              **({"config": cfg} if cfg else {})}}


#: the tiny policy's prompt templates (tasks/models/prompts/tiny_*.txt)
TINY_PROMPTS = {"plain": "tiny_plain", "explain": "tiny_explain", "hint": "tiny_hint"}


def tiny_config(base_dir: Path | None = None, *, checkpoint: Path | str | None = None, **sections):
    """The one test config factory: ``sections`` (each a config section, merged key by key) over the tests' defaults —
    a problems file that stages which never read it need not have, and with ``checkpoint`` the policy there (batch 16)
    with the tiny prompts. Relative paths resolve against ``base_dir``."""
    from tasks.registry import parse_config

    raw: dict = {"problems": {"sources": [{"file": "x.jsonl"}]}}
    if checkpoint is not None:
        raw.update(policy={"model": str(checkpoint), "batch_size": 16}, prompts=dict(TINY_PROMPTS))
    for name, value in sections.items():
        raw[name] = {**raw[name], **value} if isinstance(value, dict) and isinstance(raw.get(name), dict) else value
    return parse_config(raw, base_dir=base_dir)
