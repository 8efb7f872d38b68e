"""Launching a training stage's update as several processes on an existing engine (HF accelerate:
DDP, FSDP2, DeepSpeed ZeRO from an accelerate config; or torchrun for plain DDP, gloo on CPU).

The stage writes a job spec (JSON) beside its output directory and starts the launcher as a
subprocess on its worker module (tasks/stages/_grpo_distributed.py, _dpo_distributed.py), which
every process runs; the main process leaves the checkpoint and a metrics file in the output.

The launcher finds its own port (torchrun ``--standalone``: a c10d rendezvous it binds itself;
accelerate ``--main_process_port 0``), so no port picked here can be taken before it binds. It runs
in a process group of its own: after ``distributed.timeout_seconds`` — or when the stage is stopped
or fails — the whole group is ended, and the error names the ranks that did not finish (each rank
marks its start and end in a directory beside the spec: ``rank``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tasks.core import interrupt
from tasks.core.config import StrictModel

log = logging.getLogger("guidedrl.launch")

#: the file a worker's main process leaves beside the checkpoint
METRICS = "metrics.json"


class DistributedConfig(StrictModel):
    """How a training stage's update is launched as several processes."""

    launcher: Literal["accelerate", "torchrun"] = Field(
        "accelerate", description="accelerate: `accelerate launch --config_file CONFIG_FILE` (processes, DDP/FSDP/DeepSpeed and "
        "precision from that file); torchrun: `torchrun --nproc_per_node NUM_PROCESSES` (DDP; on CPU over gloo)")
    config_file: str | None = Field(None, description="accelerate's config file, e.g. infra/accelerate/fsdp2.yaml (launcher: accelerate)")
    num_processes: int = Field(2, gt=0, description="processes on this machine (launcher: torchrun)")
    extra_args: list[str] = Field([], description="more launcher arguments, placed before the worker module")
    timeout_seconds: float = Field(4 * 3600.0, gt=0, description="a launch still running after this long is stopped (its whole "
                                   "process group) and the stage fails naming the ranks that did not finish")

    @model_validator(mode="after")
    def _config_file_for_accelerate(self):
        if self.launcher == "accelerate" and not self.config_file:
            raise ValueError("launcher accelerate needs config_file (an accelerate config, e.g. infra/accelerate/ddp.yaml)")
        return self


def launch_command(dc: DistributedConfig, worker: str, spec: Path, resolve=Path) -> list[str]:
    """The launcher command line for ``worker`` (a module) on ``spec``; the launcher picks its own port."""
    if dc.launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(dc.num_processes)]
    else:
        head = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(resolve(dc.config_file)),
                "--main_process_port", "0"]
    return [*head, *dc.extra_args, "-m", worker, str(spec)]


@contextlib.contextmanager
def rank(spec_path: str):
    """Around a worker's work: mark this rank started, and finished when the block ends without error (``launch``
    reads the marks to name the ranks that did not finish)."""
    ranks = json.loads(Path(spec_path).read_text()).get("ranks")
    marks = Path(ranks) if ranks else None
    me = os.environ.get("RANK", "0")
    if marks:
        marks.mkdir(parents=True, exist_ok=True)
        (marks / f"{me}.started").touch()
    yield
    if marks:
        (marks / f"{me}.finished").touch()


def unfinished(marks: Path, processes: int | None) -> list[str]:
    """The ranks that have not marked themselves finished: started ones, and (of ``processes``) ones never started."""
    started = {p.name.split(".")[0] for p in marks.glob("*.started")}
    finished = {p.name.split(".")[0] for p in marks.glob("*.finished")}
    expected = {str(i) for i in range(processes)} if processes else set()
    return sorted((started | expected) - finished, key=lambda r: int(r) if r.isdigit() else 0)


def _end_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """End the launcher's process group: SIGTERM, then SIGKILL after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def launch(config, dc: DistributedConfig, stage: str, worker: str, spec: dict, out: Path) -> dict:
    """Run ``worker`` as the configured launcher's processes on ``spec`` (``out``: where the checkpoint
    lands). Returns the metrics the main process wrote; a failed launch is an error with its output's tail."""
    if dc.launcher == "accelerate" and not config.resolve(dc.config_file).is_file():
        raise ValueError(f"train.{stage}.distributed.config_file: {config.resolve(dc.config_file)} is not a file "
                         "(an accelerate config; examples in infra/accelerate/)")
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out.parent / f"{stage}-spec.json"
    marks = out.parent / f"{stage}-ranks"
    shutil.rmtree(marks, ignore_errors=True)
    spec_path.write_text(json.dumps({**spec, "out": str(out), "ranks": str(marks)}))
    cmd = launch_command(dc, worker, spec_path, config.resolve)
    log.info("%s: launching the update (timeout %.0f s): %s", stage, dc.timeout_seconds, " ".join(cmd))
    logs = out.parent / f"{stage}-launch.log"
    with open(logs, "w+") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        start = time.monotonic()
        try:
            while proc.poll() is None and time.monotonic() - start < dc.timeout_seconds:
                interrupt.check()  # a stop (SIGTERM / SIGINT) ends the ranks with the stage
                time.sleep(0.5)
            if proc.poll() is None:
                raise subprocess.TimeoutExpired(cmd, dc.timeout_seconds)
        except subprocess.TimeoutExpired:
            _end_group(proc)
            late = unfinished(marks, dc.num_processes if dc.launcher == "torchrun" else None)
            raise RuntimeError(f"{stage}: the distributed update did not finish in {dc.timeout_seconds:g} s "
                               f"(train.{stage}.distributed.timeout_seconds): rank {', '.join(late) or '?'} did not finish; "
                               f"its processes were stopped (launcher output: {logs})") from None
        finally:
            if proc.poll() is None:  # the stage was stopped (a signal) or failed while the ranks ran
                _end_group(proc)
        fh.seek(0)
        tail = fh.read()[-6000:].strip()
    log.info("%s: the update ran %.0f s", stage, time.monotonic() - start)
    if proc.returncode != 0 or not (out / METRICS).is_file():
        raise RuntimeError(f"{stage}: the distributed update failed (exit {proc.returncode}; {' '.join(cmd)}):\n{tail}")
    metrics = json.loads((out / METRICS).read_text())
    (out / METRICS).unlink()
    return metrics
