"""Real servers nobody here wrote, started as subprocesses for the tests and benchmarks.

``TransformersServe``: `transformers serve` (the OpenAI-compatible server that ships with transformers) on a free
port, pinned to a local checkpoint (its /v1/completions gives text only: no token ids, no log-probs, one choice
per request). No hub: HF_HUB_OFFLINE, and an empty cache directory of its own (its /v1/models scans the cache).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(checkpoint: str | Path, port: int) -> list[str]:
    exe = Path(sys.executable).with_name("transformers")
    return [str(exe), "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--log-level", "warning",
            str(Path(checkpoint).resolve())]


def server_env(cache: str | Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
            "OMP_NUM_THREADS": "1"}


class TransformersServe:
    """`transformers serve CHECKPOINT` on a free port; ``url`` is its /v1 base and ``model`` the name it is pinned to."""

    def __init__(self, checkpoint: str | Path, port: int | None = None, log: Path | None = None):
        self.checkpoint = Path(checkpoint).resolve()
        self.port = port or free_port()
        self.cache = tempfile.mkdtemp(prefix="guidedrl-hf-cache-")
        self.log_path = log or Path(self.cache) / "serve.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def model(self) -> str:
        return str(self.checkpoint)

    def start(self, timeout: float = 180.0) -> "TransformersServe":
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(serve_command(self.checkpoint, self.port), stdout=self._log, stderr=subprocess.STDOUT,
                                     env=server_env(self.cache), start_new_session=True)
        deadline = time.time() + timeout
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"transformers serve did not start: {Path(self.log_path).read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
