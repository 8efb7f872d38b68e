"""Run records: what each `guidedrl run` (quickstart, online, rerun) did, kept
in `<workspace>/runs/<run_id>/run.json` after its process is gone.

A record holds the command, the raw config (secrets are refused at load, so it
is safe to keep), the directory relative paths were resolved against, the
requested stages, and per stage: status (`pending`, `running`, `computed`,
`reused`, `cached`, `failed`), start and end time, seconds, output key and
path, and for a failure its error in one line. It is rewritten atomically
after every change, so a killed run leaves a record that says how far it got.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import secrets
import shutil
import socket
import time
from dataclasses import dataclass
from glob import escape as glob_escape
from pathlib import Path
from typing import Iterator

from tasks.core import interrupt, locks, owner
from tasks.core.faults import fault
from tasks.core.store import _now

RUNS_DIR = "runs"
RECORD = "run.json"
HEARTBEAT = "heartbeat"


def new_run_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def one_line(exc: BaseException) -> str:
    """An error as one line a person reads: its type and first line, without the traceback."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:500] if text else type(exc).__name__


@dataclass
class RunRecord:
    path: Path  # <workspace>/runs/<run_id>/run.json
    data: dict

    @property
    def run_id(self) -> str:
        return self.data["run_id"]

    @property
    def dir(self) -> Path:
        return self.path.parent

    @classmethod
    def create(cls, workspace: Path, command: str, raw_config: dict, base_dir: str, stages: list[str],
               rerun_of: str | None = None, run_id: str | None = None, left_out: dict[str, str] | None = None) -> "RunRecord":
        """A new run's record; ``left_out``: the stages it does not run because nothing it trains reads them, and why."""
        run_id = run_id or new_run_id()
        path = Path(workspace) / RUNS_DIR / run_id / RECORD
        path.parent.mkdir(parents=True, exist_ok=True)
        rec = cls(path, {
            "run_id": run_id, "command": command, "status": "running", "started": _now(), "finished": None,
            "workspace": str(Path(workspace).resolve()), "base_dir": base_dir, "config": raw_config,
            "stages_requested": stages, "rerun_of": rerun_of, "error": None, "failed_stage": None,
            "stages": {s: {"status": "pending"} for s in stages}, "pid": os.getpid(), "host": socket.gethostname(),
            "owner": owner.owner_tag(), "left_out": left_out or {},
        })
        rec.save()
        return rec

    @classmethod
    def open(cls, path: Path | str) -> "RunRecord":
        """The record in a run.json file, as it is on disk now."""
        return cls(Path(path), json.loads(Path(path).read_text()))

    @classmethod
    def load(cls, workspace: Path, run_id: str) -> "RunRecord":
        """The run ``run_id`` of the workspace: its full id or a prefix that names one run only."""
        root = Path(workspace) / RUNS_DIR
        if not run_id or "/" in run_id or run_id in (".", ".."):
            raise ValueError(f"{run_id!r} is not a run id: give the id `guidedrl runs ls` shows (or a prefix of it), not a path")
        path = root / run_id / RECORD
        if not path.is_file() and run_id:
            matches = sorted(p.parent.name for p in root.glob(f"{glob_escape(run_id)}*/{RECORD}"))
            if len(matches) > 1:
                raise ValueError(f"run id prefix {run_id!r} names {len(matches)} runs in {root.resolve()}: {', '.join(matches[:5])}"
                                 + (" ..." if len(matches) > 5 else "") + "; give more of the id")
            if matches:
                path = root / matches[0] / RECORD
        try:
            return cls.open(path)
        except FileNotFoundError:
            known = [r.run_id for r in list_runs(workspace)][:5]
            raise FileNotFoundError(f"no run {run_id!r} in {root.resolve()}"
                                    + (f"; recent runs: {', '.join(known)}" if known else "")) from None

    @property
    def heartbeat_path(self) -> Path:
        """The file a running run touches every `store.heartbeat_seconds` (its lease, read from other hosts)."""
        return self.dir / HEARTBEAT

    @property
    def status(self) -> str:
        """The run's status. A run recorded as running whose process is gone is ``interrupted`` (killed, or its
        machine went down) — not ``failed``: nothing said it failed, it stopped. A pid says nothing on another host:
        there, a running run whose heartbeat is older than its `store.lease_seconds` is ``stale`` (its host died, or
        lost the shared file system); a fresh heartbeat keeps it running."""
        status = self.data.get("status", "")
        if status != "running":
            return status
        tag = self.data.get("owner")
        if not tag:  # a record from before owners: the hostname and pid
            here = self.data.get("host", socket.gethostname()) == socket.gethostname()
            return "interrupted" if here and not owner.pid_alive(int(self.data.get("pid") or -1)) else status
        host, pid = owner.parse_owner(tag) or (None, -1)
        beat = self.heartbeat_path if self.heartbeat_path.exists() else self.path
        lease = ((self.data.get("config") or {}).get("store") or {}).get("lease_seconds")
        if owner.alive(host, pid, beat, float(lease) if lease else None):
            return status
        return "interrupted" if host == owner.host_id() else "stale"

    def stage_status(self, stage: str) -> str:
        """A stage's status; ``interrupted`` for one left running by an interrupted run."""
        status = self.data["stages"].get(stage, {}).get("status", "")
        return "interrupted" if status == "running" and self.status == "interrupted" else status

    def _current_stage(self) -> str | None:
        """The stage being run or last finished (fault points name it)."""
        for name, s in reversed(list(self.data.get("stages", {}).items())):
            if s.get("status") != "pending":
                return name.split("/")[-1]
        return None

    def summary(self) -> dict:
        """What `runs ls --json` gives of a run."""
        d = self.data
        done = sum(s.get("status") in ("computed", "reused", "cached") for s in d["stages"].values())
        return {"run_id": self.run_id, "command": d["command"], "status": self.status, "started": d["started"],
                "finished": d.get("finished"), "stages_done": done, "stages": len(d["stages"]), "error": d.get("error"),
                "rerun_of": d.get("rerun_of"), "record": str(self.path)}

    def save(self) -> None:
        tmp = self.path.with_name(f".{RECORD}.tmp-{owner.owner_tag()}")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")  # stages in the order they run
        fault("record.save.before-rename", self._current_stage())
        tmp.replace(self.path)

    def stage_started(self, stage: str) -> None:
        self.data["stages"].setdefault(stage, {}).update({"status": "running", "started": _now(), "t0": time.time()})
        self.save()

    def stage_finished(self, stage: str, result: dict) -> None:
        s = self.data["stages"].setdefault(stage, {})
        s.update({"status": result["status"], "finished": _now(), "seconds": round(time.time() - s.pop("t0", time.time()), 2),
                  "key": result["key"], "path": result["path"], "summary": result.get("summary", {}),
                  **{k: result[k] for k in ("shard_workers", "shard_nodes") if result.get(k)}})
        self.save()

    def stage_failed(self, stage: str, exc: BaseException) -> None:
        """A stage that failed — or was interrupted (a signal: ``KeyboardInterrupt``), which is no failure of its own."""
        s = self.data["stages"].setdefault(stage, {})
        stopped = interrupt.is_stop(exc)
        s.update({"status": "interrupted" if stopped else "failed", "finished": _now(),
                  "seconds": round(time.time() - s.pop("t0", time.time()), 2), "error": one_line(exc)})
        if stopped:
            self.data.update({"status": "interrupted", "error": f"interrupted during stage {stage} ({one_line(exc)})"})
        else:
            self.data.update({"status": "failed", "failed_stage": stage, "error": f"stage {stage} failed: {one_line(exc)}"})
        self.save()

    def finish(self, status: str = "completed", error: str | None = None) -> None:
        self.data.update({"status": status, "finished": _now()})
        if error and not self.data.get("error"):
            self.data["error"] = error
        self.save()

    def close(self, exc: BaseException | None = None) -> "RunRecord":
        """End the run (completed, or failed with ``exc`` in one line) and write its report.
        Reloads the record first: the flow updated it on disk as the stages went."""
        from tasks.report.html import write_report

        fresh = RunRecord.open(self.path)
        status = "completed" if exc is None else "interrupted" if interrupt.is_stop(exc) else "failed"
        fresh.finish(status, error=None if exc is None else one_line(exc))
        write_report(fresh)
        return fresh

    @contextlib.contextmanager
    def running(self) -> Iterator["RunRecord"]:
        """Close the record when the block ends: completed, or failed with the block's
        error in one line (the error goes on up)."""
        try:
            with owner.HEARTBEAT.hold(self.heartbeat_path):
                self.heartbeat_path.touch()
                yield self
        except BaseException as exc:
            self.close(exc)
            raise
        self.close()

    def outputs(self) -> list[str]:
        """The store paths of the stage outputs this run used or made."""
        return [s["path"] for s in self.data["stages"].values() if s.get("path")]


def list_runs(workspace: Path) -> list[RunRecord]:
    """Every run of the workspace, newest first."""
    root = Path(workspace) / RUNS_DIR
    runs = []
    for path in root.glob(f"*/{RECORD}"):
        try:
            runs.append(RunRecord.open(path))
        except (json.JSONDecodeError, OSError):
            continue
    return sorted(runs, key=lambda r: (r.data.get("started", ""), r.run_id), reverse=True)


def gc(workspace: Path, keep: int, dry_run: bool = False) -> dict:
    """Remove store outputs that none of the ``keep`` newest runs refers to, and
    leftovers of crashed writers. Outputs of a run still going are kept, and so are the outputs
    the next night would reuse rows from: for every problem key of the policies the kept runs
    sampled with, the newest output of each sampling stage that holds its rows (tasks/core/reuse.py)."""
    from tasks.core.reuse import latest_holders, policies_of
    from tasks.core.store import TMP_PREFIX, Store

    store = Store(workspace)
    runs = list_runs(workspace)
    kept_runs = runs[:keep] + [r for r in runs[keep:] if r.status == "running"]
    keep_paths = {str(Path(p).resolve()) for r in kept_runs for p in r.outputs()}
    policies = policies_of([Path(p) for p in keep_paths])
    for_reuse = {str(p) for p in latest_holders(store, policies)} - keep_paths if policies else set()
    removed, kept, freed = [], 0, 0
    for out in store.outputs():
        if str(out.path.resolve()) in keep_paths | for_reuse:
            kept += 1
            continue
        freed += sum(f.stat().st_size for f in out.path.rglob("*") if f.is_file())
        removed.append(str(out.path))
        if not dry_run:
            shutil.rmtree(out.path, ignore_errors=True)
    leftovers = []
    for d in store.root.glob("*/*"):
        name = d.name
        if not d.is_dir() or not (name.startswith(".work-") or name.startswith(TMP_PREFIX)):
            continue
        if name.startswith(TMP_PREFIX):
            if not owner.removable(d):  # its writer may still be at work (this host: its pid; another: its lease)
                continue
        elif store.in_use(d.parent.name, name.removeprefix(".work-")) or any(r.status == "running" for r in kept_runs):
            continue  # a stage is computing that output now (on any host), or a running run may resume from it
        leftovers.append(str(d))
        if not dry_run:
            shutil.rmtree(d, ignore_errors=True)
    for lock in store.root.glob("*/.lock-*"):  # lock files nobody holds (the lock is the flock, not the file)
        if locks.unlink_unheld(lock, dry_run):
            leftovers.append(str(lock))
    for tmp in (Path(workspace) / RUNS_DIR).glob(f"*/.{RECORD}.tmp-*"):  # a run record's update cut short
        parsed = owner.parse_owner(tmp.name.rsplit("-", 1)[-1])
        if parsed and owner.alive(*parsed, tmp):
            continue
        leftovers.append(str(tmp))
        if not dry_run:
            tmp.unlink(missing_ok=True)
    return {"runs_kept": [r.run_id for r in kept_runs], "outputs_kept": kept, "outputs_kept_for_reuse": sorted(for_reuse),
            "outputs_removed": removed,
            "leftovers_removed": leftovers, "bytes_freed": freed, "dry_run": dry_run}


def run_of_output(path: Path) -> str | None:
    """The newest run of the workspace whose outputs include the stage output a dataset ``path`` belongs to (None outside
    a store)."""
    try:
        output = Path(path).resolve().parent
        workspace = output.parents[2]
        for run in list_runs(workspace):
            if str(output) in {str(Path(p).resolve()) for p in run.outputs()}:
                return run.run_id
    except (IndexError, OSError, ValueError):
        return None
    return None
