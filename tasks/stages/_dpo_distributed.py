"""The dpo stage's training as several processes: what every process started by the launcher runs
(`train.dpo.distributed`; tasks/stages/_launch.py starts it). TRL's DPOTrainer does the distributed
work itself — it finds the launcher's environment, wraps the model for DDP / FSDP / DeepSpeed as the
accelerate config says and gives each process its share of every batch; the trained model is
gathered and written by the main process, which also measures the held-out pairs and writes the
metrics file the stage reads."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def worker(spec_path: str) -> None:
    from tasks.stages._launch import METRICS
    from tasks.stages.dpo import DPOTrainConfig, train

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    metrics = train(spec["base"], Path(spec["data"]), out, DPOTrainConfig(**spec["cfg"]), spec["device"], spec["dtype"])
    if metrics:  # the main process
        metrics.setdefault("processes", 1)
        (out / METRICS).write_text(json.dumps(metrics))


if __name__ == "__main__":
    from tasks.stages._launch import rank

    with rank(sys.argv[1]):
        worker(sys.argv[1])
