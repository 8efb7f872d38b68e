"""Shards on a real two-node Ray cluster started on this machine (`ray start --head`, then a second `ray start
--address`), reached through `prefect.ray_address`; then one node is lost mid-stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("prefect_ray")

from tasks.core.store import Store  # noqa: E402
from tests.conftest import _free_port, chain_sum  # noqa: E402
from tests.sampled_rows import assert_same_rows  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "data" / "models" / "tiny-policy"
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]


def _ray(*args: str, env=None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("ray")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=180, env=env or os.environ)


@pytest.fixture
def cluster(monkeypatch):
    """A head node and a second node, one CPU each (the second marked with the resource `second`); a short temp dir
    (Ray's socket paths must stay under 108 bytes)."""
    import tempfile

    temp = tempfile.mkdtemp(prefix="gr-ray-", dir="/tmp")
    port, manager = _free_port(), _free_port()
    # Ray 2.60's `ray start --head` turns token authentication on: every node and driver of the cluster says so, and
    # shares one token — a fresh one of this cluster's in the environment (a new machine has no ~/.ray/auth_token:
    # `ray start --head` then fails, "no authentication token was found")
    import secrets

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    head = _ray("start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats",
                f"--temp-dir={temp}", env=env)
    assert head.returncode == 0, head.stdout + head.stderr
    second = _ray("start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", "--num-cpus=1", f"--node-manager-port={manager}",
                  "--resources={\"second\": 1}", "--disable-usage-stats", env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    try:
        yield {"address": f"127.0.0.1:{port}", "manager_port": manager}
    finally:
        _ray("stop", "--force", env=env)
        import shutil

        shutil.rmtree(temp, ignore_errors=True)


def _alive_nodes(address: str) -> set[str]:
    """The cluster's live node ids, asked by a driver of its own."""
    import json

    code = ("import json, ray; ray.init(address=%r, log_to_driver=False); "
            "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))" % address)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RAY_AUTH_MODE": "token"})
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def _raw(address: str, shard_size: int = 2):
    return {
        "problems": {"sources": [chain_sum(16, 41, "easy", digits=1)],
                     "eval_fraction": 0.0},
        "policy": {"model": str(TINY), "batch_size": 16},
        "prompts": {"plain": "tiny_plain"},
        "rollouts": {"samples_per_problem": 4, "max_new_tokens": 48, "shard_size": shard_size},
        "prefect": {"retries": 0, "task_runner": "ray", "ray_address": address},
    }


def _run(raw: dict, tmp_path: Path, env_extra: dict | None = None, on_start=None) -> dict:
    """`guidedrl run CONFIG --stages rollouts` in its own process (the Ray driver), with the cluster's auth mode; the
    run record's rollouts entry."""
    import json

    import yaml

    from tasks.report.runs import list_runs

    cfg = tmp_path / "ray.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    exe = Path(sys.executable).with_name("guidedrl")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", **(env_extra or {})}
    proc = subprocess.Popen([str(exe), "run", str(cfg), "--stages", "rollouts", "--workspace", str(tmp_path / "ws")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    if on_start:
        on_start()
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    [record] = list_runs(tmp_path / "ws")
    return json.loads(json.dumps(record.data["stages"]["rollouts"]))


def _local_rows(tmp_path: Path):
    from tasks.registry import parse_config
    from tasks.stages import curate, rollouts

    config = parse_config({**_raw("unused"), "prefect": {"retries": 0}}, base_dir=tmp_path)
    store = Store(tmp_path / "local")
    return rollouts.STAGE.run(config, store, {"curate": curate.STAGE.run(config, store)[0]})[0].read("rollouts")


def test_shards_run_on_both_nodes_and_the_rows_equal_a_local_run(cluster, prefect_server, tmp_path):
    stage = _run(_raw(cluster["address"]), tmp_path)
    nodes = stage["shard_nodes"]
    alive = _alive_nodes(cluster["address"])
    print("shard -> node:", json.dumps(nodes, indent=1))
    assert len(nodes) == -(-stage["summary"]["problems"] // 2) and len(alive) == 2 and set(nodes.values()) == alive, (nodes, alive)  # each shard's node; both ran some
    got = Store(tmp_path / "ws").get("rollouts", Path(stage["path"]).name).read("rollouts")
    assert_same_rows(got, _local_rows(tmp_path))


def test_a_lost_node_mid_stage_its_shards_rerun_on_the_other_and_the_rows_are_the_same(cluster, prefect_server, tmp_path):
    """kill -9 the second node's raylet once the first shard is written: Ray retries the lost shard tasks on the
    head node, and the stage ends with the rows of an uninterrupted run."""
    work = tmp_path / "ws" / "store" / "rollouts"
    killed: list[str] = []

    def kill_when_a_shard_is_written():
        deadline = time.time() + 240
        while time.time() < deadline and not list(work.glob(".work-*/shard-*.parquet")):
            time.sleep(0.05)
        found = subprocess.run(["pgrep", "-f", f"raylet.*node_manager_port={cluster['manager_port']}"], capture_output=True, text=True)
        for pid in found.stdout.split():
            os.kill(int(pid), signal.SIGKILL)
            killed.append(pid)

    watcher = threading.Thread(target=kill_when_a_shard_is_written, daemon=True)
    stage = _run(_raw(cluster["address"], shard_size=1), tmp_path, on_start=watcher.start)
    watcher.join(timeout=5)
    assert killed, "the second node's raylet was not found"
    print("killed raylet", killed, "; shard -> node:", json.dumps(stage.get("shard_nodes"), indent=1))
    got = Store(tmp_path / "ws").get("rollouts", Path(stage["path"]).name).read("rollouts")
    assert got.num_rows == stage["summary"]["problems"] * 4
    assert_same_rows(got, _local_rows(tmp_path))
