"""Shard tasks: the shards of rollouts, guidance (explain, hint) and grading fan out as
Prefect tasks on threads, or on a local Ray."""

import os
import socket
from pathlib import Path

import pytest

from flows.pipeline import pipeline
from tasks.core.store import Store
from tests.sampled_rows import assert_same_rows
from tests.conftest import chain_sum

pytestmark = pytest.mark.slow  # end to end: shards fanned out on threads and a local Ray

TINY = Path(__file__).resolve().parents[1] / "data" / "models" / "tiny-policy"


def _raw(checkpoint, **prefect):
    return {
        "problems": {"sources": [chain_sum(12, 31, "easy", digits=1)],
                     "eval_fraction": 0.0},
        "policy": {"model": str(checkpoint), "batch_size": 16},
        "prompts": {"plain": "tiny_plain"},
        "rollouts": {"samples_per_problem": 2, "max_new_tokens": 24, "shard_size": 4},
        "prefect": {"retries": 0, **prefect},
    }


def _shard_runs(stage: str = "rollouts", flow_run_id=None):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName

    async def read():
        async with get_client() as client:
            flows = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])) if flow_run_id else None
            return await client.read_task_runs(flow_run_filter=flows,
                                               task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=f"{stage}-shard-")))

    return asyncio.run(read())


def _guided_raw(checkpoint, **prefect):
    """Easy problems the tiny policy solves and 2-digit ones it is stuck on, every stage in small shards."""
    raw = _raw(checkpoint, **prefect)
    raw["problems"]["sources"].append(chain_sum(10, 32, "hard", digits=2))
    raw["prompts"].update({"explain": "tiny_explain", "hint": "tiny_hint"})
    raw["explain"] = {"problems": "all", "samples_per_problem": 2, "shard_size": 5}
    raw["hint"] = {"samples_per_problem": 2, "shard_size": 2}
    raw["judge"] = {"backend": "rule", "mode": "process", "shard_size": 10}
    return raw


def test_guidance_and_grading_fan_out_and_match_the_sequential_stages(prefect_server, tmp_path):
    from prefect import flow

    from tasks.registry import parse_config

    raw = _guided_raw(TINY, max_workers=2)

    @flow(name="fan-out-test")
    def fanned(raw_config: dict):
        from prefect.runtime import flow_run

        return flow_run.id, pipeline.fn(raw_config=raw_config, base_dir=str(tmp_path), workspace=str(tmp_path / "ws"),
                                        stages=["explain", "hint", "grade"])

    flow_run_id, out = fanned(raw)
    # the same stages, each shard after shard in one stage task (fan_out off), in another workspace
    seq_raw = {**raw, "prefect": {**raw["prefect"], "fan_out": False}}
    seq = pipeline(raw_config=seq_raw, base_dir=str(tmp_path), workspace=str(tmp_path / "seq"), stages=["explain", "hint", "grade"])
    config = parse_config(raw, base_dir=tmp_path)
    stuck = out["hint"]["summary"]["hinted_problems"]
    planned = {"explain": -(-out["explain"]["summary"]["target_problems"] // 5), "hint": -(-stuck // 2),
               "grade": -(-out["rollouts"]["summary"]["samples"] // 10)}
    assert planned["explain"] >= 3 and planned["hint"] >= 2 and planned["grade"] >= 4, planned
    for stage, dataset in {"explain": "explanations", "hint": "hints", "grade": "grades"}.items():
        got = Store(tmp_path / "ws").get(stage, Path(out[stage]["path"]).name).read(dataset)
        want = Store(tmp_path / "seq").get(stage, Path(seq[stage]["path"]).name).read(dataset)
        assert got.num_rows == want.num_rows and got.equals(want), stage
        assert out[stage]["summary"] == seq[stage]["summary"], stage
        names = {r.name for r in _shard_runs(stage, flow_run_id) if r.state and r.state.is_completed()}
        assert names == {f"{stage}-shard-{i:05d}" for i in range(planned[stage])}, (stage, names)
        assert not any(p.name.startswith(".work-") for p in (tmp_path / "ws" / "store" / stage).iterdir())
    assert out["grade"]["summary"]["traces"] == out["rollouts"]["summary"]["samples"]
    assert out["explain"]["summary"]["kept"] > 0 and config.explain.shard_size == 5


def test_threads_fan_out_shards_and_the_output_matches_the_sequential_stage(prefect_server, tmp_path):
    from tasks.registry import parse_config
    from tasks.stages import curate, rollouts

    raw = _raw(TINY, max_workers=2)
    out = pipeline(raw_config=raw, base_dir=str(tmp_path), workspace=str(tmp_path / "ws"), stages=["rollouts"])
    fanned = Store(tmp_path / "ws").get("rollouts", Path(out["rollouts"]["path"]).name).read("rollouts")
    # the same stage without Prefect, shard after shard, in shards of another size, in another workspace: the same rows
    config = parse_config({**raw, "rollouts": {**raw["rollouts"], "shard_size": 5}}, base_dir=tmp_path)
    store = Store(tmp_path / "seq")
    seq, _ = rollouts.STAGE.run(config, store, {"curate": curate.STAGE.run(config, store)[0]})
    assert fanned.num_rows == 24
    assert_same_rows(fanned, seq.read("rollouts"))
    assert not any(p.name.startswith(".work-") for p in (tmp_path / "ws" / "store" / "rollouts").iterdir())
    assert out["rollouts"]["shard_workers"] == [f"{socket.gethostname()}:{os.getpid()}"]  # threads of this process


@pytest.mark.filterwarnings("ignore")
def test_ray_runs_the_shard_tasks_on_a_local_cluster(prefect_server, tmp_path):
    pytest.importorskip("prefect_ray")
    raw = _guided_raw(TINY, task_runner="ray", ray_init={"num_cpus": 2, "include_dashboard": False, "log_to_driver": False})
    out = pipeline(raw_config=raw, base_dir=str(tmp_path), workspace=str(tmp_path / "ws"), stages=["explain", "grade"])
    assert out["rollouts"]["status"] == "computed" and out["rollouts"]["summary"]["samples"] == 44
    # each sharded stage's shard tasks ran in Ray worker processes, not in this one
    for stage in ("rollouts", "explain", "grade"):
        workers = out[stage]["shard_workers"]
        assert workers and all(not w.endswith(f":{os.getpid()}") for w in workers), (stage, workers)
    # 22 problems in shards of 4: six rollout shard tasks; 44 traces in shards of 10: five grade shard tasks
    assert {r.name for r in _shard_runs() if r.state and r.state.is_completed()} >= {f"rollouts-shard-{i:05d}" for i in range(6)}
    assert {r.name for r in _shard_runs("grade") if r.state and r.state.is_completed()} >= {f"grade-shard-{i:05d}" for i in range(5)}
    assert out["grade"]["summary"]["traces"] == 44 and out["explain"]["summary"]["kept"] > 0
    # Ray workers, shards of 4 and 5: the rows of one process sampling shards of 7 problems, in another workspace
    from tasks.registry import parse_config
    from tasks.stages import curate, explain, rollouts
    from tasks.stages import filter as filter_stage

    config = parse_config({**raw, "rollouts": {**raw["rollouts"], "shard_size": 7}, "explain": {**raw["explain"], "shard_size": 7}},
                          base_dir=tmp_path)
    store = Store(tmp_path / "one-process")
    up = {"curate": curate.STAGE.run(config, store)[0]}
    up["rollouts"] = rollouts.STAGE.run(config, store, up)[0]
    up["filter"] = filter_stage.STAGE.run(config, store, up)[0]
    alone = {"rollouts": up["rollouts"], "explain": explain.STAGE.run(config, store, up)[0]}
    for stage, dataset in {"rollouts": "rollouts", "explain": "explanations"}.items():
        assert_same_rows(Store(tmp_path / "ws").get(stage, Path(out[stage]["path"]).name).read(dataset), alone[stage].read(dataset))


def test_a_failed_shard_is_retried_alone_with_the_stage_retries_of_the_config(prefect_server, tmp_path, monkeypatch):
    from tasks.models import judge

    raw = _raw(TINY, stage_retries={"grade": 1}, retry_delay_seconds=0)
    raw["judge"] = {"backend": "rule", "shard_size": 8}
    real, calls = judge.RuleJudge.grade, []

    def flaky(self, traces):
        calls.append(traces[0].sample_id)
        if len(calls) == 2:
            raise ConnectionError("judge went away")  # the second shard, once
        return real(self, traces)

    monkeypatch.setattr(judge.RuleJudge, "grade", flaky)
    out = pipeline(raw_config=raw, base_dir=str(tmp_path), workspace=str(tmp_path / "ws"), stages=["grade"])
    assert out["grade"]["status"] == "computed" and out["grade"]["summary"]["traces"] == 24
    # 24 traces in shards of 8: three shards, the second graded twice (its retry), the others once
    assert len(calls) == 4 and calls[1] == calls[2] and len(set(calls)) == 3

    raw["prefect"]["stage_retries"] = {"grade": 0}
    raw["judge"]["mode"] = "outcome"  # another output: graded again, and this time the failure is final
    calls.clear()
    with pytest.raises(ConnectionError, match="judge went away"):
        pipeline(raw_config=raw, base_dir=str(tmp_path), workspace=str(tmp_path / "ws"), stages=["grade"])
    assert len(calls) == 3  # the other shards still ran to the end
    # the finished shards wait in the work directory for the re-run; the failed one left nothing
    (work,) = (tmp_path / "ws" / "store" / "grade").glob(".work-*")
    assert sorted(p.name for p in work.iterdir()) == [f"shard-0000{i}.{ext}" for i in (0, 2) for ext in ("json", "parquet")]
