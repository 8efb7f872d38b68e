"""Who owns a piece of unfinished work in a workspace, and when another host may take it away.

A workspace on a shared file system is written by processes on several machines (or containers,
where every worker's main process is pid 1). A pid means something only on its own host — its own
PID namespace — so every temporary, scratch and work directory and every run record names its
writer as an *owner*: ``<host>.<pid>``, where ``host`` (``host_id``) is a hash of the hostname, the
boot id and the PID namespace. Temporary names end ``-<owner>-<random>``.

While a writer lives, a daemon thread (``Heartbeat``) touches what it holds every
``heartbeat_seconds``: its mtime is its lease. A leftover may be removed (``removable``):

- when it is this host's: once its writer's process is gone (at once: the pid says so here);
- when it is another host's (or its owner is unknown): only once its lease has expired — no touch
  for ``lease_seconds`` — for a pid says nothing on another host, and a host that died never cleans
  up after itself.

The two settings are the workspace's `store` config section (tasks/core/config.py); every host of a
workspace should use the same ones. ``configure`` sets them for the process.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

log = logging.getLogger("guidedrl.owner")


@dataclass
class Lease:
    #: how often a live writer touches what it holds
    heartbeat_seconds: float = 30.0
    #: how long another host's leftover is left alone after its last touch
    lease_seconds: float = 600.0


LEASE = Lease()


def configure(heartbeat_seconds: float | None = None, lease_seconds: float | None = None) -> None:
    """Set this process's lease settings (a run's `store` config section)."""
    if heartbeat_seconds is not None:
        LEASE.heartbeat_seconds = float(heartbeat_seconds)
    if lease_seconds is not None:
        LEASE.lease_seconds = float(lease_seconds)
    HEARTBEAT.wake()


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


@lru_cache(maxsize=None)
def _host_id(hostname: str, boot_id: str, pidns: str) -> str:
    return hashlib.sha256(f"{hostname}|{boot_id}|{pidns}".encode()).hexdigest()[:12]


def host_id() -> str:
    """This host's id (hex, no ``-`` or ``.``): its hostname, boot id and PID namespace, hashed. Two containers are
    two hosts even with one kernel; a rebooted machine or a restarted container is a new one."""
    return _host_id(socket.gethostname(), _read("/proc/sys/kernel/random/boot_id"), _pid_namespace())


def owner_tag(pid: int | None = None) -> str:
    """``<host>.<pid>``: the owner part of a temporary's name."""
    return f"{host_id()}.{os.getpid() if pid is None else pid}"


def parse_owner(tag: str) -> tuple[str | None, int] | None:
    """(host, pid) of an owner tag ``<host>.<pid>``; host None for a bare pid (names from before hosts were named);
    None when the tag says nothing."""
    host, _, pid = tag.rpartition(".")
    try:
        return (host or None), int(pid)
    except ValueError:
        return None


def owner_of(name: str) -> tuple[str | None, int] | None:
    """(host, pid) from a temporary's name ``…-<owner>-<random>`` (``parse_owner``); None when the name says nothing."""
    parts = name.split("-")
    return parse_owner(parts[-2]) if len(parts) >= 3 else None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (a zombie — exited, not yet reaped — does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def lease_age(path: Path) -> float:
    """Seconds since ``path`` was last touched (its writer's heartbeat, or its last change)."""
    return time.time() - path.stat().st_mtime


def alive(host: str | None, pid: int, path: Path, lease_seconds: float | None = None) -> bool:
    """Whether the writer ``(host, pid)`` of ``path`` may still be at work: this host's while its process runs;
    another host's (or an unknown one's) while its lease on ``path`` is fresh (``lease_seconds``, default the process's)."""
    if host == host_id():
        return pid_alive(pid)
    try:
        return lease_age(path) < (LEASE.lease_seconds if lease_seconds is None else lease_seconds)
    except FileNotFoundError:
        return False


def removable(path: Path) -> bool:
    """Whether the leftover ``path`` (a temporary named ``…-<owner>-<random>``) may be removed now."""
    owner = owner_of(path.name)
    host, pid = owner if owner else (None, -1)
    return not alive(host, pid, path)


def new_name(prefix: str) -> str:
    """``<prefix>-<owner>-<random>``: a temporary's name."""
    import uuid

    return f"{prefix}-{owner_tag()}-{uuid.uuid4().hex[:8]}"


class Heartbeat:
    """Touches every path held (``hold``) every ``LEASE.heartbeat_seconds``, from one daemon thread per process."""

    def __init__(self) -> None:
        self._held: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while True:
            self._wake.wait(LEASE.heartbeat_seconds)
            self._wake.clear()
            self.beat()

    def beat(self) -> None:
        """Touch every held path now."""
        with self._lock:
            paths = list(self._held)
        for path in paths:
            with contextlib.suppress(OSError):
                os.utime(path)

    @contextlib.contextmanager
    def hold(self, path: Path) -> Iterator[Path]:
        """Keep ``path``'s lease fresh while the block runs."""
        path = Path(path)
        with self._lock:
            self._held[path] = self._held.get(path, 0) + 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="guidedrl-heartbeat", daemon=True)
                self._thread.start()
        try:
            yield path
        finally:
            with self._lock:
                self._held[path] -= 1
                if not self._held[path]:
                    del self._held[path]


HEARTBEAT = Heartbeat()
