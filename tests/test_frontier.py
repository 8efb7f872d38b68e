"""The frontier: per problem and round, stuck or not, what each guidance verified, when it left the stuck set."""

import json
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from tasks.core.schemas import to_table
from tasks.core.store import Store
from tasks.report.frontier import build_frontier, by_round, combine, frontier_table, round_outputs
from tasks.report.runs import RunRecord

ROOT = Path(__file__).resolve().parents[1]


def _rollout(pid, j, correct, kind="plain", error=False, level="hard"):
    return {"sample_id": f"{pid}-{kind}-{j}", "problem_id": pid, "sample_idx": j, "prompt": "q", "completion": "c",
            "completion_token_ids": [1, 2], "temperature": 1.0, "finish_reason": "error" if error else "stop",
            "correct": correct, "policy_id": "p", "prompt_kind": kind, "loss_prompt": "q", "level": level}


def _write(store, stage, key, name, kind, rows):
    return store.write(stage, key, {name: (kind, to_table(rows, kind))}, config={}, inputs={}, stage_version="t").path


def _round(store, r, outcomes, explain=(), hint=(), partial=(), leaked=()):
    """One round's outputs: ``outcomes`` problem -> list of rollout results (None: generation error)."""
    rows = [_rollout(p, j, bool(c), error=c is None) for p, cs in outcomes.items() for j, c in enumerate(cs)]
    paths = {"rollouts": _write(store, "rollouts", f"r{r}", "rollouts", "rollouts", rows)}
    if explain is not None:
        ex = [{**_rollout(p, j, True, "explain"), "selected": j == 0, "leaks_answer": p in leaked} for p in explain for j in range(2)]
        ex.append({**_rollout("other", 0, False, "explain"), "selected": False})  # a wrong explanation counts for nothing
        paths["explain"] = _write(store, "explain", f"e{r}", "explanations", "explanations", ex)
    if hint is not None:
        paths["hint"] = _write(store, "hint", f"h{r}", "hints", "rollouts", [_rollout(p, 0, True, "hint") for p in hint])
    grades = [{"sample_id": row["sample_id"], "outcome_score": 0.5 if row["problem_id"] in partial else 0.0,
               "step_scores": [1.0, 0.0] if row["problem_id"] in partial else [0.0], "steps": ["a"], "judge": "rule", "parse_ok": True}
              for row in rows]
    paths["grade"] = _write(store, "grade", f"g{r}", "grades", "grades", grades)
    return {f"round-{r}/{s}": {"status": "computed", "path": str(p)} for s, p in paths.items()}


def test_frontier_rows_by_problem_and_round(tmp_path):
    store = Store(tmp_path / "ws")
    stages = {
        # A: stuck in round 1 with a verified explanation, solved in round 2. B: never stuck.
        # C: stuck both rounds, judge partial credit in round 2 only. D: stuck in round 1, hint + judge at once.
        # E: every sample an error in round 1 (not stuck: nothing known), then stuck; its explanation leans on the answer.
        **_round(store, 1, {"A": [0, 0, 0], "B": [1, 0, 1], "C": [0, 0, 0], "D": [0, 0, 0], "E": [None, None, None]},
                 explain=["A"], hint=["D"], partial=["D"]),
        **_round(store, 2, {"A": [1, 0, 0], "B": [1, 1, 1], "C": [0, 0, 0], "D": [0, None, 0], "E": [0, 0, 0]},
                 explain=["E"], leaked=["E"], hint=[], partial=["C"]),
        "round-2/materialize": {"status": "failed"},
    }
    rounds = round_outputs(stages)
    assert list(rounds) == [1, 2] and set(rounds[1]) == {"rollouts", "explain", "hint", "grade"}
    t = frontier_table("run-x", rounds)
    rows = {(r["round"], r["problem_id"]): r for r in t.to_pylist()}
    assert len(rows) == 10 and t.column_names[:3] == ["run_id", "round", "problem_id"]
    a1, a2 = rows[1, "A"], rows[2, "A"]
    assert (a1["stuck"], a1["explain_verified"], a1["hint_verified"], a1["judge_partial"]) == (True, 2, 0, 0)
    assert (a2["stuck"], a2["num_correct"], a2["n"], a2["pass_rate"]) == (False, 1, 3, pytest.approx(1 / 3))
    assert (a1["left_stuck_round"], a1["first_guided_round"], a1["first_guidance"]) == (2, 1, "explain")
    assert rows[2, "A"]["left_stuck_round"] == 2  # per-problem columns repeat on every round's row
    b = rows[1, "B"]
    assert (b["stuck"], b["left_stuck_round"], b["first_guided_round"], b["first_guidance"]) == (False, None, None, None)
    c1, c2 = rows[1, "C"], rows[2, "C"]
    assert c1["judge_partial"] == 0 and c2["judge_partial"] == 3
    assert (c1["left_stuck_round"], c1["first_guided_round"], c1["first_guidance"]) == (None, 2, "judge")
    d = rows[1, "D"]
    assert (d["hint_verified"], d["judge_partial"], d["first_guidance"], d["first_guided_round"]) == (1, 3, "hint+judge", 1)
    assert rows[2, "D"]["n"] == 2 and rows[2, "D"]["stuck"]  # the error sample does not count
    e1, e2 = rows[1, "E"], rows[2, "E"]
    assert (e1["n"], e1["pass_rate"], e1["stuck"]) == (0, None, False)
    assert e2["stuck"] and e2["explain_verified"] == 0 and e2["first_guidance"] is None  # leaked explanations are not verified

    summary = {r["round"]: r for r in by_round(t)}
    assert (summary[1]["stuck"], summary[1]["explain"], summary[1]["hint"], summary[1]["judge"], summary[1]["left_stuck"]) == (3, 1, 1, 1, 0)
    assert (summary[2]["stuck"], summary[2]["judge"], summary[2]["left_stuck"], summary[2]["problems"]) == (3, 1, 1, 5)

    out, reused = build_frontier(store, "run-x", rounds)
    again, reused_again = build_frontier(store, "run-x", rounds)
    assert not reused and reused_again and again.path == out.path
    assert out.summary["stuck_first"] == 3 and out.summary["left_stuck"] == 1
    files = sorted((out.path / "frontier" / "data").glob("*.parquet"))
    assert pq.read_table(files).num_rows == 10
    assert pl.scan_parquet([str(f) for f in files]).filter(pl.col("first_guidance") == "hint+judge").collect()["problem_id"].unique().to_list() == ["D"]


def test_round_outputs_of_a_plain_run_and_without_guidance(tmp_path):
    store = Store(tmp_path / "ws")
    path = _write(store, "rollouts", "only", "rollouts", "rollouts", [_rollout("A", 0, False), _rollout("B", 0, True)])
    rounds = round_outputs({"curate": {"status": "reused", "path": str(tmp_path)}, "rollouts": {"status": "cached", "path": str(path)}})
    assert list(rounds) == [1] and set(rounds[1]) == {"curate", "rollouts"}
    t = frontier_table("plain", rounds)
    assert t.column("explain_verified").null_count == 2 and t.column("judge_partial").null_count == 2  # not run: null, not 0
    assert by_round(t)[0]["explain"] is None and by_round(t)[0]["stuck"] == 1
    with pytest.raises(ValueError, match="no finished rollouts"):
        frontier_table("none", round_outputs({"rollouts": {"status": "failed"}}))


def test_combine_nights_orders_runs_and_finds_the_night_a_problem_left(tmp_path):
    store = Store(tmp_path / "ws")
    night1 = frontier_table("n1", round_outputs(_round(store, 1, {"A": [0, 0], "B": [0, 0]}, explain=["A"])
                                                | _round(store, 2, {"A": [0, 0], "B": [0, 0]})))
    store2 = Store(tmp_path / "ws2")
    night2 = frontier_table("n2", round_outputs(_round(store2, 1, {"A": [0, 1], "B": [0, 0]}, hint=["B"])))
    both = combine([night1, night2])
    rows = {(r["night"], r["round"], r["problem_id"]): r for r in both.to_pylist()}
    a = rows[1, 1, "A"]
    assert (a["left_stuck_night"], a["left_stuck_round"], a["first_guidance"], a["first_guided_night"], a["first_guided_round"]) == \
        (2, 1, "explain", 1, 1)
    b = rows[2, 1, "B"]
    assert (b["left_stuck_night"], b["first_guidance"], b["first_guided_night"]) == (None, "hint", 2)
    per = by_round(both)
    assert [(r["night"], r["round"], r["stuck"], r["left_stuck"]) for r in per] == [(1, 1, 2, 0), (1, 2, 2, 0), (2, 1, 1, 1)]
    # the other order: A was solved on the first night and stuck on the second; it never left the stuck set after that
    rev = {(r["night"], r["problem_id"]): r for r in combine([night2, night1]).to_pylist()}
    assert rev[1, "A"]["left_stuck_night"] is None


def test_frontier_command_records_prints_and_keeps_it(tmp_path, cli):
    ws = tmp_path / "ws"
    store = Store(ws)
    rec = RunRecord.create(ws, "online", {"materialize": {"lte_replace": False}}, str(ROOT), [])
    rec.data["stages"].update(_round(store, 1, {"A": [0, 0], "B": [1, 1]}, explain=["A"]) | _round(store, 2, {"A": [1, 0], "B": [1, 1]}))
    rec.finish()
    night = RunRecord.create(ws, "run", {}, str(ROOT), [])
    night.data["stages"].update(_round(Store(ws), 3, {"A": [1, 1], "B": [0, 0]}))
    night.finish()

    def frontier(*args):
        return cli("frontier", *args, "-w", str(ws), check=False, timeout=120)

    p = frontier(rec.run_id[:-2])
    assert p.returncode == 0, p.stderr
    assert "stuck set by round" in p.stdout and "explain (round 1)" in p.stdout and "round 2" in p.stdout
    saved = RunRecord.load(ws, rec.run_id).data["stages"]["frontier"]
    assert saved["status"] == "computed" and saved["summary"]["left_stuck"] == 1
    assert (RunRecord.load(ws, rec.run_id).dir / "frontier.png").is_file()  # the report was written again, with its chart
    assert "Frontier and learning by round" in (RunRecord.load(ws, rec.run_id).dir / "report.html").read_text()
    from datasets import Dataset

    ds = Dataset.from_parquet(str(Path(saved["path"]) / "frontier" / "data" / "*.parquet"))
    assert ds.num_rows == 4 and set(ds["problem_id"]) == {"A", "B"}

    p = frontier(rec.run_id, night.run_id, "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert [r["night"] for r in out["by_round"]] == [1, 1, 2] and out["runs"] == [rec.run_id, night.run_id]
    assert [(x["problem_id"], x["left_stuck_night"], x["left_stuck_round"]) for x in out["left_stuck"]] == [("A", 1, 2)]

    p = frontier("nope")
    assert p.returncode == 1 and p.stderr.count("error:") == 1 and "no run 'nope'" in p.stderr
    cli("gc", "--keep", "2", "-w", str(ws))
    assert Path(saved["path"]).is_dir()  # a kept run's frontier stays
