"""The `bootstrap` flow: build and train the tiny policy, then measure it.

    guidedrl bootstrap [--out data/models/tiny-policy] [--seed 0] [--steps N] [--size tiny|100m] [--device auto]

The checkpoint committed under data/models/tiny-policy was made by this flow
with the defaults of tasks.models.tiny_policy.TinyPolicyConfig; the same seed reproduces it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from prefect import flow, task

from tasks.models.transformers_backend import TransformersBackend
from tasks.models.tiny_policy import TinyPolicyConfig, evaluate_policy, train_tiny_policy


@task(name="train-tiny-policy", cache_policy=None)
def train(cfg: dict, out_dir: str, device: str = "cpu") -> dict:
    return train_tiny_policy(TinyPolicyConfig(**cfg), Path(out_dir), device)


@task(name="evaluate-tiny-policy", cache_policy=None)
def evaluate(out_dir: str, cfg: dict, problems_per_level: int, n: int, device: str = "cpu") -> dict:
    c = TinyPolicyConfig(**cfg)
    backend = TransformersBackend(out_dir, batch_size=256, device=device)
    return evaluate_policy(backend, {"easy": c.easy, "hard": c.hard}, problems_per_level=problems_per_level, n=n,
                           max_new_tokens=c.max_new_tokens)


@flow(name="guidedrl-bootstrap")
def bootstrap(out_dir: str, cfg: dict | None = None, problems_per_level: int = 40, n: int = 64, device: str = "cpu") -> dict:
    cfg = asdict(TinyPolicyConfig(**(cfg or {})))
    info = train(cfg, out_dir, device)
    report = evaluate(out_dir, cfg, problems_per_level, n, device)
    info["eval"] = report
    path = Path(out_dir) / "bootstrap.json"
    tmp = path.with_name(".bootstrap.json.tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(path)
    return info
