"""Several hosts on one machine: each a PID namespace (its own pids, a pid 1) with a hostname of its own (a UTS
namespace), all sharing one workspace directory — as machines share a workspace on a network file system, or
containers a volume. Needs root (as CI runs) and util-linux's ``unshare``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT


def can_unshare() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "--uts", "true"], capture_output=True)
    return probe.returncode == 0


needs_namespaces = pytest.mark.skipif(not can_unshare(), reason="needs root and unshare (PID and UTS namespaces)")


class Host:
    """``code`` (Python) run on a host of its own named ``name``: as the namespace's pid 1 (``pid1``: a container's
    main process), or as a child of a shell that is pid 1."""

    def __init__(self, name: str, code: str, pid1: bool = True, env: dict | None = None):
        prelude = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        run = f'exec "$0" -c "$1"' if pid1 else f'"$0" -c "$1"; exit $?'
        self.name = name
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", "--uts", "--kill-child", "sh", "-c", f"hostname {name} && {run}",
             sys.executable, prelude + code],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})

    def init(self) -> psutil.Process:
        """The namespace's pid 1, as this machine sees it."""
        deadline = time.time() + 10
        while time.time() < deadline:
            children = psutil.Process(self.proc.pid).children()
            if children:
                return children[0]
            time.sleep(0.05)
        raise AssertionError(f"host {self.name}: no process in its namespace")

    def kill(self) -> None:
        """The host goes down: kill -9 its pid 1 (the kernel ends every process of the namespace with it)."""
        self.init().kill()
        self.proc.wait(timeout=30)

    def result(self, timeout: float = 120) -> str:
        out, _ = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, f"host {self.name} failed ({self.proc.returncode}):\n{out}"
        return out


def wait_for(path: Path, timeout: float = 60, host: Host | None = None) -> None:
    """Until ``path`` exists (a host's signal that it got there)."""
    deadline = time.time() + timeout
    while not path.exists():
        if host is not None and host.proc.poll() is not None:
            raise AssertionError(f"host {host.name} ended before {path.name}:\n{host.proc.stdout.read()}")
        assert time.time() < deadline, f"timed out waiting for {path}"
        time.sleep(0.05)
