"""Run records, re-running one failed stage in a new process, the run report, gc."""

import json
from pathlib import Path

import pytest
import yaml

from tasks.core.store import Store
from tasks.registry import downstream_of, parse_config
from tasks.report.runs import RunRecord, gc, list_runs
from tests.openai_server import OpenAIServer
from tests.conftest import chain_sum


def _config(tmp_path: Path, checkpoint: Path, judge_url: str) -> Path:
    cfg = {
        "problems": {"sources": [chain_sum(8, 21, "hard", terms=3)], "eval_fraction": 0.0},
        "policy": {"model": str(checkpoint), "batch_size": 32},
        "prompts": {"plain": "tiny_plain", "explain": "tiny_explain", "hint": "tiny_hint"},
        "rollouts": {"samples_per_problem": 2, "max_new_tokens": 8},
        "explain": {"samples_per_problem": 1},
        "judge": {"backend": "openai", "base_url": judge_url, "model": "judge-m", "mode": "process", "max_retries": 0,
                  "timeout_seconds": 2},
        "prefect": {"retries": 0, "retry_delay_seconds": 0},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_rerun_of_the_failed_grading_stage_in_a_new_process_redoes_only_grading_and_what_follows(tmp_path, cli, random_checkpoint):
    with OpenAIServer() as srv:  # a free port, then nobody listening on it: the judge is down
        url = srv.base_url
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    ws = tmp_path / "ws"
    cfg = _config(tmp_path, random_checkpoint, url)
    failed = cli("run", str(cfg), "--stages", "materialize", "--workspace", str(ws), check=False)
    assert failed.returncode == 1
    err = " ".join(failed.stderr.split())
    assert "failed: stage grade failed: JudgeError: grade: 16 of 16 judge requests" in err and "guidedrl rerun" in err

    [run] = list_runs(ws)
    d = run.data
    assert d["status"] == "failed" and d["failed_stage"] == "grade" and "JudgeError" in d["error"] and "\n" not in d["error"]
    assert {s: v["status"] for s, v in d["stages"].items()} == {
        "curate": "computed", "rollouts": "computed", "filter": "computed", "explain": "computed", "hint": "computed",
        "rubric": "computed", "grade": "failed", "materialize": "pending"}
    assert (run.dir / "report.html").is_file() and "Failed." in (run.dir / "report.html").read_text()
    created = {o.path: o.manifest["created"] for o in Store(ws).outputs()}
    shown = cli("runs", "show", run.run_id, "--workspace", str(ws)).stdout
    assert "grade" in shown and "failed" in shown and "JudgeError" in shown

    with OpenAIServer(port=port) as srv:
        out = cli("rerun", run.run_id, "--stage", "grade", "--downstream", "--workspace", str(ws))
        assert len([r for r in srv.behaviour.requests if "messages" in r]) == 16
    assert "running grade, materialize again" in " ".join(out.stdout.split())
    newest = list_runs(ws)[0]
    assert newest.data["rerun_of"] == run.run_id and newest.data["status"] == "completed"
    statuses = {s: v["status"] for s, v in newest.data["stages"].items()}
    assert statuses["grade"] == "computed" and statuses["materialize"] == "computed"
    assert all(statuses[s] in ("reused", "cached") for s in ("curate", "rollouts", "filter", "explain", "hint", "rubric"))
    # the upstream outputs are the very same files, untouched
    assert all(o.manifest["created"] == created[o.path] for o in Store(ws).outputs() if o.path in created)
    assert len(Store(ws).outputs("grade")) == 1 and len(Store(ws).outputs("materialize")) == 1
    report = (newest.dir / "report.html").read_text()
    assert "Judge" in report and "parse rate" in report and "judge.png" in report and (newest.dir / "judge.png").is_file()
    assert "runs" in cli("runs", "ls", "--workspace", str(ws)).stdout


def test_downstream_follows_the_stage_graph():
    stages = ["curate", "rollouts", "filter", "explain", "hint", "rubric", "grade", "materialize", "dpo", "eval"]
    assert downstream_of("grade", stages) == ["materialize", "dpo", "eval"]
    assert downstream_of("hint", stages) == ["materialize", "dpo", "eval"]
    assert downstream_of("rubric", ["curate", "rollouts", "rubric", "grade"]) == ["grade"]
    assert downstream_of("eval", stages) == []


def test_gc_keeps_what_the_newest_runs_use_and_removes_the_rest(tmp_path):
    from tasks.core.schemas import to_table

    ws = tmp_path / "ws"
    store = Store(ws)
    table = to_table([{"source": "s", "row": "{}", "reason": "x"}], "rejected")
    outs = [store.write("curate", f"k{i}", {"rejected": ("rejected", table)}, config={}, inputs={}, stage_version="t")
            for i in range(3)]
    (store.root / "rollouts" / ".work-deadbeef").mkdir(parents=True)  # a crashed rollout stage's shards
    for i, out in enumerate(outs):
        rec = RunRecord.create(ws, "run", {}, str(tmp_path), ["curate"], run_id=f"2026010{i}-000000-aaaaa{i}")
        rec.stage_finished("curate", {"status": "computed", "key": out.key, "path": str(out.path)})
        rec.finish("completed")
    dry = gc(ws, keep=2, dry_run=True)
    assert dry["outputs_removed"] == [str(outs[0].path)] and outs[0].path.exists()
    done = gc(ws, keep=2)
    assert not outs[0].path.exists() and outs[1].path.exists() and outs[2].path.exists()
    assert done["leftovers_removed"] == [str(store.root / "rollouts" / ".work-deadbeef")]
    assert json.loads((ws / "runs" / "20260102-000000-aaaaa2" / "run.json").read_text())["status"] == "completed"


def test_run_ids_are_never_cut_scripts_get_json_and_a_unique_prefix_names_a_run(tmp_path, cli):
    """`runs ls` in an 80-column terminal shows whole ids; --json for scripts; `runs show` takes a unique prefix."""
    ws = tmp_path / "ws"
    ids = ["20261201-101010-aaaaa1", "20261201-101010-aaaab2", "20261130-090909-cccccc"]
    for run_id in ids:
        rec = RunRecord.create(ws, "run", {}, str(tmp_path), ["curate"], run_id=run_id)
        rec.data["error"] = "stage curate failed: SourceError: a long error message that would push the id out of an 80-column table"
        rec.finish("failed")
    import os
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("guidedrl")
    narrow = subprocess.run([str(exe), "runs", "ls", "--workspace", str(ws)], capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "80"})
    assert narrow.returncode == 0 and all(run_id in narrow.stdout for run_id in ids), narrow.stdout
    listed = json.loads(cli("runs", "ls", "--workspace", str(ws), "--json").stdout)
    assert [r["run_id"] for r in listed] == sorted(ids, reverse=True) and listed[0]["status"] == "failed"
    shown = json.loads(cli("runs", "show", "20261130", "--workspace", str(ws), "--json").stdout)
    assert shown["run_id"] == "20261130-090909-cccccc"
    assert "20261201-101010-aaaab2" in cli("runs", "show", "20261201-101010-aaaab", "--workspace", str(ws)).stdout
    ambiguous = cli("runs", "show", "20261201", "--workspace", str(ws), check=False)
    assert ambiguous.returncode == 1 and "names 2 runs" in ambiguous.stderr and "give more of the id" in ambiguous.stderr
    assert json.loads(cli("datasets", "ls", "--workspace", str(ws), "--json").stdout) == []


@pytest.mark.slow
def test_two_runs_at_once_compute_each_output_once_and_agree(tmp_path, cli, random_checkpoint):
    """Two `guidedrl run` processes, same config, same fresh workspace, started together: each stage
    output is computed by one of them while the other waits on its lock and reuses it; both finish
    and name the same outputs."""
    import os
    import subprocess
    import sys

    from tasks.registry import select_stages

    with OpenAIServer() as server:
        cfg = _config(tmp_path, random_checkpoint, server.base_url)
        exe = Path(sys.executable).with_name("guidedrl")
        cmd = [str(exe), "run", str(cfg), "--stages", "materialize", "--workspace", str(tmp_path / "ws")]
        procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, "COLUMNS": "200"}) for _ in range(2)]
        outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    records = list_runs(tmp_path / "ws")
    assert len(records) == 2 and {r.status for r in records} == {"completed"}
    stages = select_stages(["materialize"], config=parse_config(yaml.safe_load(cfg.read_text()), base_dir=tmp_path))
    for stage in stages:
        a, b = (r.data["stages"][stage] for r in records)
        assert a["path"] == b["path"], stage
        assert sorted([a["status"], b["status"]]) in (["computed", "reused"], ["cached", "computed"]), (stage, a["status"], b["status"])
    assert len(Store(tmp_path / "ws").outputs()) == len(stages)
