"""Many machines, one store: two hosts (PID + UTS namespaces, tests/hosts.py) share a workspace. One host never
removes another's live work; a dead host's leftovers go once its lease has expired; its run reads `stale`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.hosts import Host, needs_namespaces, wait_for

pytestmark = needs_namespaces

SETUP = """
import os, pathlib, shutil, time
from tasks.core import owner
from tasks.core.schemas import to_table
from tasks.core.store import Store
ws = pathlib.Path({ws!r}); sync = ws / "sync"; sync.mkdir(parents=True, exist_ok=True)
store = Store(ws)
table = to_table([{{"source": "s", "row": "{{}}", "reason": "x"}}], "rejected")
def write(key):
    return store.write("dpo", key, {{"rejected": ("rejected", table)}}, config={{}}, inputs={{}}, stage_version="t")
"""

# host A trains a dpo output in a scratch directory of the store until told to go on, then publishes it
TRAINER = SETUP + """
with store.scratch("dpo") as scratch:
    ckpt = scratch / "checkpoint"
    ckpt.mkdir()
    for i in range(3):
        (ckpt / f"weights-{{i}}.bin").write_bytes(os.urandom(1000))
    (sync / "a-working").write_text(scratch.name)
    while not (sync / "b-done").exists():
        time.sleep(0.05)
    (ckpt / "weights-3.bin").write_bytes(os.urandom(1000))  # A goes on: its scratch must still be there
    out = store.write("dpo", "from-a", {{"rejected": ("rejected", table)}}, config={{}}, inputs={{}}, stage_version="t",
                      directories={{"checkpoint": ckpt}})
print("A", os.getpid(), "files", len(list((out.path / "checkpoint").iterdir())))
"""


@pytest.mark.parametrize("a_pid1", [False, True], ids=["a-child-pid", "both-pid-1"])
def test_a_write_on_one_host_leaves_another_hosts_training_alone(tmp_path, a_pid1):
    """(a) host B publishes dpo outputs while host A trains another one in its scratch directory: both finish and
    nothing of A's is removed. B is a container's pid 1; A's writer is another pid of its namespace (no such pid on B: the
    store used to take A for dead and remove its scratch) or pid 1 too (d: every pid 1 looks alive everywhere)."""
    ws = tmp_path / "ws"
    a = Host("host-a", TRAINER.format(ws=str(ws)), pid1=a_pid1)
    wait_for(ws / "sync" / "a-working", host=a)
    scratch = ws / "store" / "dpo" / (ws / "sync" / "a-working").read_text()
    b = Host("host-b", SETUP.format(ws=str(ws)) + """
write("from-b-1")
write("from-b-2")
(sync / "b-done").touch()
print("B pid", os.getpid())
""")
    assert b.result().split() == ["B", "pid", "1"]
    out = a.result()
    words = out.split()
    assert words[::2] == ["A", "files"] and words[3] == "4" and (words[1] == "1") == a_pid1, out
    assert sorted(p.name for p in (ws / "store" / "dpo").iterdir() if not p.name.startswith(".lock")) == ["from-a", "from-b-1", "from-b-2"]
    assert not scratch.exists()  # A removed its own scratch when done


def test_gc_on_one_host_removes_nothing_another_host_works_on(tmp_path):
    """(b) `gc` on host B while host A computes an output (its lock held, its shards' work directory, a scratch
    directory and a store write in flight) and after A's earlier run left a crashed writer's debris on B itself."""
    ws = tmp_path / "ws"
    a = Host("host-a", SETUP.format(ws=str(ws)) + """
with store.lock("rollouts", "k1"), store.scratch("dpo") as scratch:
    work = ws / "store" / "rollouts" / ".work-k1"
    work.mkdir(parents=True)
    (work / "shard-00000.parquet").write_bytes(b"x")
    (scratch / "weights.bin").write_bytes(b"w")
    (sync / "a-working").write_text(scratch.name)
    while not (sync / "b-done").exists():
        time.sleep(0.05)
    assert (work / "shard-00000.parquet").exists() and (scratch / "weights.bin").exists()
print("A ok")
""")
    wait_for(ws / "sync" / "a-working", host=a)
    scratch = ws / "store" / "dpo" / (ws / "sync" / "a-working").read_text()
    b = Host("host-b", SETUP.format(ws=str(ws)) + """
import json
from tasks.report.runs import gc
dead = ws / "store" / "dpo" / f".tmp-scratch-{owner.host_id()}.999999-deadbeef"  # B's own crashed writer (pid 999999: gone)
dead.mkdir(parents=True)
done = gc(ws, keep=0)
(sync / "b-done").touch()
print(json.dumps({"removed": done["leftovers_removed"], "dead": str(dead)}))
""")
    seen = json.loads(b.result().strip().splitlines()[-1])
    assert a.result().strip() == "A ok"  # A's shards and scratch were there when it finished
    assert seen["removed"] == [seen["dead"]]  # only B's own dead writer's debris
    assert scratch.exists() is False and (ws / "store" / "rollouts" / ".lock-k1").exists()


@pytest.mark.parametrize("a_pid1", [False, True], ids=["a-child-pid", "both-pid-1"])
def test_a_dead_hosts_leftovers_go_when_its_lease_expires_and_its_run_reads_stale(tmp_path, a_pid1):
    """(c) host A (a run going, a scratch directory, heartbeat 0.3 s, lease 3 s) is killed with kill -9. Host B's
    next write leaves A's scratch alone while the lease runs, and A's run reads running; once the lease has expired
    B's write removes it, and `runs ls` shows A's run stale. (d) With A's writer pid 1, as in containers, the store
    used to keep a dead host's leftovers forever."""
    from tasks.report.runs import RunRecord

    ws = tmp_path / "ws"
    a = Host("host-a", SETUP.format(ws=str(ws)) + """
from tasks.report.runs import RunRecord
owner.configure(heartbeat_seconds=0.3, lease_seconds=3)
record = RunRecord.create(ws, "run", {"store": {"heartbeat_seconds": 0.3, "lease_seconds": 3}}, str(ws), ["dpo"])
with record.running(), store.scratch("dpo") as scratch:
    (sync / "a-working").write_text(record.run_id + " " + scratch.name)
    time.sleep(600)
""", pid1=a_pid1)
    wait_for(ws / "sync" / "a-working", host=a)
    run_id, scratch_name = (ws / "sync" / "a-working").read_text().split()
    scratch = ws / "store" / "dpo" / scratch_name
    time.sleep(1.0)
    assert RunRecord.load(ws, run_id).status == "running"  # another host's run: its heartbeat is fresh
    a.kill()
    t_dead = time.time()
    b = Host("host-b", SETUP.format(ws=str(ws)) + f"""
owner.configure(lease_seconds=3)
write("b-1")
print("kept" if (ws / "store" / "dpo" / {scratch_name!r}).exists() else "removed")
time.sleep(max(0.0, 3.5 - (time.time() - {t_dead})))
write("b-2")
print("kept" if (ws / "store" / "dpo" / {scratch_name!r}).exists() else "removed")
""")
    assert b.result().split() == ["kept", "removed"]
    assert not scratch.exists()
    assert RunRecord.load(ws, run_id).status == "stale"
    from tests.conftest import ROOT

    exe = Path(sys.executable).with_name("guidedrl")
    listed = subprocess.run([str(exe), "runs", "ls", "--json", "--workspace", str(ws)], cwd=ROOT, capture_output=True, text=True)
    assert [r["status"] for r in json.loads(listed.stdout)] == ["stale"], listed.stdout + listed.stderr
