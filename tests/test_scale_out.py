"""Shard tasks: the rollout stage's shards fan out as Prefect tasks on threads, or on a local Ray."""

import os
import socket
from pathlib import Path

import pytest

from flows.pipeline import pipeline
from tasks.store import Store

TINY = Path(__file__).resolve().parents[1] / "data" / "models" / "tiny-policy"


def _raw(checkpoint, **prefect):
    return {
        "problems": {"sources": [{"reasoning_gym": {"task": "chain_sum", "size": 12, "seed": 31, "level": "easy",
                                                    "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}}}],
                     "eval_fraction": 0.0},
        "policy": {"model": str(checkpoint), "batch_size": 16},
        "prompts": {"plain": "tiny_plain"},
        "rollouts": {"samples_per_problem": 2, "max_new_tokens": 24, "shard_size": 4},
        "prefect": {"retries": 0, **prefect},
    }


def _shard_runs():
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    async def read():
        async with get_client() as client:
            return await client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="rollouts-shard-")))

    return asyncio.run(read())


def test_threads_fan_out_shards_and_the_output_matches_the_sequential_stage(prefect_server, tmp_path):
    from tasks import curate, rollouts
    from tasks.config import parse_config

    raw = _raw(TINY, max_workers=2)
    out = pipeline(raw_config=raw, base_dir=str(tmp_path), workspace=str(tmp_path / "ws"), stages=["rollouts"])
    fanned = Store(tmp_path / "ws").get("rollouts", Path(out["rollouts"]["path"]).name).read("rollouts")
    # the same stage without Prefect, shard after shard, in another workspace: the same rows
    config = parse_config(raw, base_dir=tmp_path)
    store = Store(tmp_path / "seq")
    seq, _ = rollouts.run(config, store, {"curate": curate.run(config, store)[0]})
    assert fanned.num_rows == 24 and fanned.select(["sample_id", "completion"]).equals(seq.read("rollouts").select(["sample_id", "completion"]))
    assert not any(p.name.startswith(".work-") for p in (tmp_path / "ws" / "store" / "rollouts").iterdir())
    assert out["rollouts"]["shard_workers"] == [f"{socket.gethostname()}:{os.getpid()}"]  # threads of this process


@pytest.mark.filterwarnings("ignore")
def test_ray_runs_the_shard_tasks_on_a_local_cluster(prefect_server, tmp_path):
    pytest.importorskip("prefect_ray")
    raw = _raw(TINY, task_runner="ray", ray_init={"num_cpus": 2, "include_dashboard": False, "log_to_driver": False})
    out = pipeline(raw_config=raw, base_dir=str(tmp_path), workspace=str(tmp_path / "ws"), stages=["rollouts"])
    assert out["rollouts"]["status"] == "computed" and out["rollouts"]["summary"]["samples"] == 24
    # 12 problems in shards of 4: three shard tasks, run by Ray worker processes, not by this one
    workers = out["rollouts"]["shard_workers"]
    assert workers and all(not w.endswith(f":{os.getpid()}") for w in workers)
    assert {r.name for r in _shard_runs() if r.state and r.state.is_completed()} >= {f"rollouts-shard-{i:05d}" for i in range(3)}
