"""Launching a training stage's update as several processes on an existing engine (HF accelerate:
DDP, FSDP2, DeepSpeed ZeRO from an accelerate config; or torchrun for plain DDP, gloo on CPU).

The stage writes a job spec (JSON) beside its output directory and starts the launcher as a
subprocess on its worker module (tasks/stages/_grpo_distributed.py, _dpo_distributed.py), which
every process runs; the main process leaves the checkpoint and a metrics file in the output.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

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

    @model_validator(mode="after")
    def _config_file_for_accelerate(self):
        if self.launcher == "accelerate" and not self.config_file:
            raise ValueError("launcher accelerate needs config_file (an accelerate config, e.g. infra/accelerate/ddp.yaml)")
        return self


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(dc: DistributedConfig, worker: str, spec: Path, resolve=Path) -> list[str]:
    """The launcher command line for ``worker`` (a module) on ``spec``."""
    port = str(_free_port())
    if dc.launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(dc.num_processes), "--master_port", port]
    else:
        head = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(resolve(dc.config_file)),
                "--main_process_port", port]
    return [*head, *dc.extra_args, "-m", worker, str(spec)]


def launch(config, dc: DistributedConfig, stage: str, worker: str, spec: dict, out: Path) -> dict:
    """Run ``worker`` as the configured launcher's processes on ``spec`` (``out``: where the checkpoint
    lands). Returns the metrics the main process wrote; a failed launch is an error with its output's tail."""
    if dc.launcher == "accelerate" and not config.resolve(dc.config_file).is_file():
        raise ValueError(f"train.{stage}.distributed.config_file: {config.resolve(dc.config_file)} is not a file "
                         "(an accelerate config; examples in infra/accelerate/)")
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out.parent / f"{stage}-spec.json"
    spec_path.write_text(json.dumps({**spec, "out": str(out)}))
    cmd = launch_command(dc, worker, spec_path, config.resolve)
    log.info("%s: launching the update: %s", stage, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0 or not (out / METRICS).is_file():
        tail = (proc.stdout[-2000:] + "\n" + proc.stderr[-4000:]).strip()
        raise RuntimeError(f"{stage}: the distributed update failed (exit {proc.returncode}; {' '.join(cmd)}):\n{tail}")
    metrics = json.loads((out / METRICS).read_text())
    (out / METRICS).unlink()
    return metrics
