"""A served policy that follows training (`policy.serve`, used by `guidedrl online`).

Where the policy is sampled (an OpenAI-compatible server: `policy.backend: openai`) and
which checkpoint is trained (`policy.checkpoint`, a local directory) are two roles of one
policy. After each online round the server must serve the checkpoint that round trained
before the next round sends a request; the two ways vLLM documents for a separate server:

- ``restart``: run `policy.serve.restart_command` (a template: {checkpoint}, {model},
  {port}, {base_url}) and wait until the server's ``/v1/models`` lists the served name
  with the new checkpoint as its ``root`` (what vLLM reports for the model it loaded).
  A command that keeps running is the server: guidedrl stops its process group before
  the next restart and when the online run ends.
- ``lora``: ``POST /v1/load_lora_adapter`` with the round's adapter (`checkpoint/adapter`;
  vLLM needs ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``), wait until ``/v1/models`` lists
  it, and sample by the adapter's name. Each round continues the same adapter on the
  server's base model (`train.grpo.lora_adapter`), so the adapter the server applies is
  always relative to the weights it holds.

The rows then carry the policy_id of the checkpoint they came from (policy.policy_id_for).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

from tasks.core.config import ConfigError
from tasks.core.owner import pid_alive
from tasks.models.generation import checkpoint_fingerprint
from tasks.models.served import headers

log = logging.getLogger("guidedrl.serving")

#: the server processes this process started (restart commands that kept running), by base_url
_OWNED: dict[str, subprocess.Popen] = {}


class ServingError(RuntimeError):
    """The served policy could not be made to follow the new checkpoint."""


def _headers(policy) -> dict:
    return headers(policy.api_key_env)


def _base_url(policy) -> str:
    url = policy.base_url or os.environ.get("OPENAI_BASE_URL")
    if not url:
        raise ServingError("policy.base_url: a served policy needs the server's URL (or OPENAI_BASE_URL)")
    return url.rstrip("/")


def served_models(policy, timeout: float = 10.0) -> list[dict]:
    """What the server lists at ``/v1/models`` (id, root, parent, ...)."""
    resp = httpx.get(f"{_base_url(policy)}/models", headers=_headers(policy), timeout=timeout)
    resp.raise_for_status()
    return list(resp.json().get("data", []))


def _same_path(a: str | None, b: str) -> bool:
    return a is not None and (a == b or Path(a).resolve() == Path(b).resolve())


def _find(models: list[dict], name: str, root: str) -> dict | None:
    """The entry of ``models`` (``/v1/models``) that serves ``name`` loaded from ``root``."""
    return next((m for m in models if m.get("id") == name and _same_path(m.get("root"), root)), None)


def listed(policy, name: str, root: Path | str) -> dict | None:
    """What the server lists now for ``name`` loaded from ``root`` (None: not listed, or no answer)."""
    try:
        return _find(served_models(policy), name, str(root))
    except (httpx.HTTPError, ValueError):
        return None


def wait_until_served(policy, name: str, root: str, timeout: float, proc: subprocess.Popen | None = None,
                      log_path: Path | None = None) -> dict:
    """Poll ``/v1/models`` until it lists ``name`` loaded from ``root``; the entry. Fails when ``proc``
    (the restart command) exits non-zero or the time is up, saying what the server last listed."""
    deadline, last = time.monotonic() + timeout, "nothing (not answering)"
    while True:
        try:
            models = served_models(policy)
            entry = _find(models, name, root)
            if entry is not None:
                return entry
            last = ", ".join(f"{m.get('id')} (root {m.get('root')})" for m in models) or "no models"
        except (httpx.HTTPError, ValueError) as exc:
            last = f"nothing ({type(exc).__name__}: {str(exc)[:200]})"
        if proc is not None and proc.poll() not in (None, 0):
            tail = log_path.read_text(errors="replace")[-2000:] if log_path and log_path.is_file() else ""
            raise ServingError(f"policy.serve.restart_command exited with {proc.returncode} before the server listed {name} "
                               f"at {root} (log {log_path}):\n{tail}")
        if time.monotonic() > deadline:
            raise ServingError(f"the server at {_base_url(policy)} did not list {name} loaded from {root} within "
                               f"{timeout:.0f} s (policy.serve.ready_timeout_seconds); it lists {last}")
        time.sleep(0.5)


#: pid files of the servers started (a run killed before it could stop its server: the next one stops it)
_PIDFILES: dict[str, Path] = {}


def _stop_group(pid: int) -> None:
    """SIGTERM to a process group, SIGKILL after 30 s."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if pid_alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop_owned(base_url: str | None = None) -> None:
    """Stop the server processes this process started (all, or the one for ``base_url``): SIGTERM to the
    process group, SIGKILL after 30 s."""
    for url in [u for u in list(_OWNED) if base_url is None or u == base_url]:
        proc = _OWNED.pop(url)
        if proc.poll() is None:
            log.info("stopping the policy server it started (pid %d, %s)", proc.pid, url)
            _stop_group(proc.pid)
            proc.wait()
        pidfile = _PIDFILES.pop(url, None)
        if pidfile is not None:
            pidfile.unlink(missing_ok=True)


def stop_orphan(pidfile: Path) -> None:
    """A server an earlier run started and could not stop (it was killed): stop it now, it holds the port."""
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    if pid_alive(pid):
        log.warning("stopping the policy server a previous run started and left running (pid %d, %s)", pid, pidfile)
        _stop_group(pid)
    pidfile.unlink(missing_ok=True)


def restart_on(policy, checkpoint: Path, log_dir: Path, cwd: Path | None = None) -> dict:
    """Run the restart command on ``checkpoint`` and wait until the server serves it."""
    url = _base_url(policy)
    port = urlparse(url).port or (443 if url.startswith("https") else 80)
    cmd = policy.serve.restart_command.format(checkpoint=shlex.quote(str(checkpoint)), model=shlex.quote(policy.model),
                                              port=port, base_url=shlex.quote(url))
    stop_owned(url)  # the server it started for the previous round
    log_dir.mkdir(parents=True, exist_ok=True)
    pidfile = log_dir / f"serve-{port}.pid"
    stop_orphan(pidfile)
    log_path = log_dir / f"serve-{time.strftime('%Y%m%d-%H%M%S')}-{checkpoint_fingerprint(checkpoint)[5:13]}.log"
    log.info("restarting the policy server on %s: %s (log %s)", checkpoint, cmd, log_path)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, shell=True, start_new_session=True, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    pidfile.write_text(f"{proc.pid}\n")
    t0 = time.monotonic()
    _OWNED[url], _PIDFILES[url] = proc, pidfile  # while it runs it is the server (or on its way to being it)
    try:
        entry = wait_until_served(policy, policy.model, str(checkpoint), policy.serve.ready_timeout_seconds, proc, log_path)
    except BaseException:
        stop_owned(url)  # a server that never came up is not left running
        raise
    log.info("the server lists %s from %s after %.1f s", policy.model, checkpoint, time.monotonic() - t0)
    return entry


def adapter_name(checkpoint: Path) -> str:
    """The name a round's LoRA adapter is served under: named by the checkpoint it makes."""
    return "guidedrl-" + checkpoint_fingerprint(checkpoint).removeprefix("ckpt-")


def load_adapter(policy, adapter: Path, name: str) -> dict:
    """Load a LoRA adapter into the server (vLLM's ``/v1/load_lora_adapter``) and wait until it is listed."""
    url = _base_url(policy)
    entry = listed(policy, name, adapter)
    if entry is not None:  # loaded before (a resumed run): loading again would be refused
        log.info("the server already serves LoRA adapter %s from %s", name, adapter)
        return entry
    resp = httpx.post(f"{url}/load_lora_adapter", json={"lora_name": name, "lora_path": str(adapter)},
                      headers=_headers(policy), timeout=policy.timeout_seconds)
    if resp.status_code >= 400:
        raise ServingError(f"the server at {url} refused LoRA adapter {name} ({adapter}): HTTP {resp.status_code} "
                           f"{resp.text[:300]} — a vLLM server needs --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True")
    log.info("loaded LoRA adapter %s from %s", name, adapter)
    return wait_until_served(policy, name, str(adapter), policy.serve.ready_timeout_seconds)


def check_following(config, rounds: int) -> None:
    """A served policy sampled over several rounds must follow the checkpoints (policy.serve.follow)."""
    p = config.policy
    if p.backend == "vllm" and rounds > 1:
        raise ConfigError("guidedrl online with policy.backend vllm: the in-process engine is not reloaded between rounds; "
                          "serve it (backend openai, policy.serve.follow: restart or lora) or use backend transformers")
    if p.backend != "openai" or rounds == 1:
        return
    if p.serve.follow == "none":
        raise ConfigError("guidedrl online over several rounds with a served policy: set policy.serve.follow (restart: "
                          "restart_command on each new checkpoint; lora: load each round's adapter), or the server would "
                          "keep sampling the first round's policy")
    from tasks.models.policy import checkpoint_dir

    ckpt = checkpoint_dir(config)
    if ckpt is None or not ckpt.is_dir():
        raise ConfigError(f"guidedrl online with a served policy: policy.checkpoint ({p.checkpoint}) must be the local model "
                          "directory the server was started on (the rounds train it and the server follows it)")
    if p.serve.follow == "lora" and not config.train.grpo.lora:
        raise ConfigError("policy.serve.follow: lora needs train.grpo.lora: true (the server loads the round's adapter)")


def start(policy, checkpoint: Path, log_dir: Path, cwd: Path | None = None) -> None:
    """Before the first round (follow: restart): the server serves the initial checkpoint — one already
    serving it is used as it is; otherwise the restart command starts it (and guidedrl owns it: a server
    started by hand on the same port would have to be stopped by the command itself)."""
    if policy.serve.follow == "restart" and listed(policy, policy.model, checkpoint) is None:
        restart_on(policy, Path(checkpoint).resolve(), log_dir, cwd)


def follow(policy, checkpoint: Path, log_dir: Path, cwd: Path | None = None) -> dict:
    """Make the served policy serve ``checkpoint`` (a round's grpo output); the `policy` settings of the
    next round: the checkpoint its samples come from and, for LoRA, the adapter's served name."""
    checkpoint = Path(checkpoint).resolve()
    mode = policy.serve.follow
    if mode == "restart":
        restart_on(policy, checkpoint, log_dir, cwd)
        return {"checkpoint": str(checkpoint)}
    if mode == "lora":
        adapter = checkpoint / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            raise ServingError(f"policy.serve.follow: lora, but {checkpoint} has no adapter/ (set train.grpo.lora: true)")
        name = adapter_name(checkpoint)
        load_adapter(policy, adapter, name)
        return {"checkpoint": str(checkpoint), "model": name}
    raise ServingError(f"policy.serve.follow is {mode}: the server would keep serving the old policy")
