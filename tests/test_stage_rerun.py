"""Every stage on its own, on one finished quickstart workspace (built once per test session):

- `guidedrl run CONFIG --stages S` brings S's upstream stages along (transitively) and reuses every output;
- `guidedrl rerun RUN --stage S` computes S again, reusing the rest (same rows where S is deterministic);
- `--downstream` re-runs exactly the stages below S;
- the training deployment's flow (dpo, grpo, eval) on a workspace whose data stages are done.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tasks.core.config import read_yaml
from tasks.core.store import Store
from tasks.registry import STAGES, downstream_of, parse_config, select_stages
from tasks.report.runs import RunRecord, list_runs

pytestmark = pytest.mark.slow  # end to end: every stage re-run on copies of a finished quickstart

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def _outputs(ws: Path) -> dict[str, tuple[str, str, dict]]:
    """store path -> (stage, created, dataset fingerprints)"""
    return {str(o.path.relative_to(ws)): (o.stage, o.manifest["created"], o.fingerprints) for o in Store(ws).outputs()}


def _copy(finished_quickstart, tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    shutil.copytree(finished_quickstart["workspace"], ws)
    return ws


def _newest(ws: Path) -> RunRecord:
    return list_runs(ws)[0]


def test_the_quickstart_record_names_every_stage(finished_quickstart):
    record = RunRecord.load(finished_quickstart["workspace"], finished_quickstart["run_id"])
    newer = ("prefix", "self_hint")  # guidance beyond the three papers: only its own presets read it
    assert list(record.data["stages"]) == [s for s in STAGES if s not in newer] and set(record.data["left_out"]) == set(newer)
    assert all(s["status"] == "computed" for s in record.data["stages"].values())


def test_upstream_is_the_transitive_closure():
    # (without a config, materialize brings every guidance it may read)
    guidance = ["curate", "rollouts", "filter", "explain", "hint", "prefix", "rubric", "grade", "self_hint", "materialize"]
    assert select_stages(["dpo"]) == guidance + ["dpo"]
    assert select_stages(["grpo"]) == guidance + ["grpo"]
    # eval reads the trained checkpoints only when their stages are requested or ran
    assert select_stages(["eval"]) == ["curate", "eval"]
    assert select_stages(["eval"], present={"dpo"}) == guidance + ["dpo", "eval"]
    assert select_stages(["curate", "dpo"]) == select_stages(["dpo"])
    # resolving a resolved list changes nothing (the CLI and the flow both resolve)
    for stage in STAGES:
        resolved = select_stages([stage], present=STAGES)
        assert select_stages(resolved) == resolved


#: the stages the quickstart runs: prefix and self_hint (guidance beyond the three papers) are left out of it
QUICKSTART_STAGES = [s for s in STAGES if s not in ("prefix", "self_hint")]


@pytest.mark.parametrize("stages", [*QUICKSTART_STAGES, "curate,dpo"])
def test_run_one_stage_reuses_every_upstream_output(finished_quickstart, tmp_path, cli, stages):
    ws = _copy(finished_quickstart, tmp_path)
    before = _outputs(ws)
    out = cli("run", str(QUICKSTART), "--stages", stages, "--workspace", str(ws), cwd=ROOT)
    record = _newest(ws)
    assert record.data["status"] == "completed", out.stdout
    ran = record.data["stages"]
    config = parse_config(read_yaml(QUICKSTART), base_dir=ROOT)  # (materialize reads the guidance this config uses)
    expected = select_stages(stages.split(","), present={"dpo", "grpo"}, config=config)  # the quickstart trained both
    assert list(ran) == expected
    assert all(v["status"] in ("reused", "cached") for v in ran.values()), ran
    assert _outputs(ws) == before  # nothing written, nothing replaced
    assert "nothing was recomputed" in out.stdout


@pytest.mark.parametrize("stage", QUICKSTART_STAGES)
def test_rerun_one_stage_computes_it_again_and_reuses_the_rest(finished_quickstart, tmp_path, cli, stage):
    ws = _copy(finished_quickstart, tmp_path)
    before = _outputs(ws)
    cli("rerun", finished_quickstart["run_id"], "--stage", stage, "--workspace", str(ws), cwd=tmp_path)
    record = _newest(ws)
    assert record.data["rerun_of"] == finished_quickstart["run_id"] and record.data["status"] == "completed"
    statuses = {s: v["status"] for s, v in record.data["stages"].items()}
    assert statuses.pop(stage) == "computed"
    assert set(statuses.values()) <= {"reused", "cached"}, statuses
    # the same outputs, at the same paths; only the re-run stage's output was written again
    after = _outputs(ws)
    assert after.keys() == before.keys()
    changed = [p for p in after if after[p][1] != before[p][1]]
    assert [after[p][0] for p in changed] == [stage]
    # every stage is deterministic on the same inputs (seeded sampling and training on CPU): the same bytes again
    assert after[changed[0]][2] == before[changed[0]][2], f"{stage}: other rows when computed again"
    # eval measured the same policies as the run it re-ran (base, dpo, grpo)
    if stage == "eval":
        assert set(record.data["stages"]) == set(QUICKSTART_STAGES)


@pytest.mark.parametrize("stage", ["grade", "dpo"])
def test_rerun_downstream_reruns_exactly_the_stages_below(finished_quickstart, tmp_path, cli, stage):
    ws = _copy(finished_quickstart, tmp_path)
    cli("rerun", finished_quickstart["run_id"], "--stage", stage, "--downstream", "--workspace", str(ws), cwd=tmp_path)
    statuses = {s: v["status"] for s, v in _newest(ws).data["stages"].items()}
    below = downstream_of(stage, list(STAGES))
    assert sorted(s for s, v in statuses.items() if v == "computed") == sorted([stage, *below])
    assert all(v in ("reused", "cached") for s, v in statuses.items() if s not in below and s != stage)


def test_downstream_of_every_stage_in_the_quickstart():
    below = {s: downstream_of(s, list(STAGES)) for s in STAGES}
    assert below["curate"] == [s for s in STAGES if s != "curate"]
    assert below["grade"] == ["materialize", "dpo", "grpo", "eval"]
    assert below["dpo"] == ["eval"] and below["grpo"] == ["eval"] and below["eval"] == []
    assert below["rubric"] == ["grade", "materialize", "dpo", "grpo", "eval"]


def test_training_deployment_flow_trains_on_finished_data_stages(finished_quickstart, tmp_path, prefect_server):
    """As the worker runs `guidedrl-training/training`: the flow with the deployment's parameters."""
    from flows.deployments import training

    ws = _copy(finished_quickstart, tmp_path)
    for stage in ("dpo", "grpo", "eval"):  # the data stages are done, the training ones not yet
        shutil.rmtree(ws / "store" / stage)
    data_outputs = _outputs(ws)
    out = training(config_path=str(QUICKSTART), base_dir=str(ROOT), workspace=str(ws))
    record = RunRecord.load(ws, out["run_id"])
    assert record.data["command"] == "deployment:training" and record.data["status"] == "completed"
    statuses = {s: v["status"] for s, v in record.data["stages"].items()}
    assert {s for s, v in statuses.items() if v == "computed"} == {"dpo", "grpo", "eval"}
    assert set(out["outputs"]) == set(QUICKSTART_STAGES)
    after = _outputs(ws)
    assert {p: v for p, v in after.items() if p in data_outputs} == data_outputs
    assert sorted(v[0] for p, v in after.items() if p not in data_outputs) == ["dpo", "eval", "grpo"]
