"""tasks/core/groups.py: chunks of whole problems, whether the main dataset is in problem_id order or not."""

import random

import pyarrow as pa

from tasks.core.groups import Rows, Source, partition, read_chunk
from tasks.core.schemas import to_table
from tasks.core.store import Store

PROBLEMS = [f"p{i:02d}" for i in range(12)]


def _rollout(pid: str, j: int) -> dict:
    return {"sample_id": f"{pid}-{j}", "problem_id": pid, "sample_idx": j, "prompt": "q", "completion": f"{pid} says {j}",
            "completion_token_ids": [j, j + 1, j + 2], "behaviour_logprobs": [-0.5, -0.25, -0.125], "temperature": 1.0,
            "finish_reason": "stop", "extracted_answer": str(j), "correct": j % 2 == 0, "policy_id": "pol", "prompt_kind": "plain",
            "guidance": None, "loss_prompt": "q", "loss_logprobs": None, "level": "easy", "error": None}


def _grade(sample_id: str) -> dict:
    return {"sample_id": sample_id, "outcome_score": 0.5, "step_scores": [0.5], "steps": ["x"], "judge": "rule",
            "judge_raw": None, "parse_ok": True, "error": None}


def _outputs(tmp_path, name: str, rollouts: list[dict], part_rows: int):
    """A rollouts output written in parts of ``part_rows`` rows (so chunks cross file and batch ends) and one of grades."""
    store = Store(tmp_path / name)
    parts = [to_table(rollouts[i:i + part_rows], "rollouts") for i in range(0, len(rollouts), part_rows)]
    ro = store.write("rollouts", "k", {"rollouts": ("rollouts", parts)}, config={}, inputs={}, stage_version="1")
    grades = [_grade(r["sample_id"]) for r in reversed(rollouts)]  # another order than the rollouts'
    gr = store.write("grade", "k", {"grades": ("grades", to_table(grades, "grades"))}, config={}, inputs={}, stage_version="1")
    return Source(ro, "rollouts"), {"grades": Source(gr, "grades", ["sample_id", "outcome_score"], join_on="sample_id")}


def test_a_main_dataset_in_problem_order_is_read_in_place_with_the_chunks_of_a_routed_one(tmp_path):
    """Problems of 1–6 samples each. In problem_id order, the main dataset's chunks are row ranges of its own files
    (nothing copied); shuffled, its rows are routed into chunk files. Both give the same chunks: the same problems, whole,
    each chunk at most ``max_rows`` rows, the rows of each problem in their original relative order, and the grades of
    the same samples."""
    rng = random.Random(0)
    in_order = [_rollout(pid, j) for pid in PROBLEMS for j in range(rng.randint(1, 6))]
    shuffled = in_order[:]
    rng.shuffle(shuffled)
    found = {}
    for name, rows in (("in_order", in_order), ("shuffled", shuffled)):
        main, others = _outputs(tmp_path, name, rows, part_rows=5)
        chunks = partition(main, others, 7, tmp_path / name / "work")
        kinds = {type(c["main"]) for c in chunks}
        assert kinds == ({Rows} if name == "in_order" else {type(tmp_path)}), name
        found[name] = []
        for c in chunks:
            table = read_chunk(c["main"])
            grades = read_chunk(c["grades"])
            assert table.num_rows <= 7
            assert sorted(grades.column("sample_id").to_pylist()) == sorted(table.column("sample_id").to_pylist())
            found[name].append(table.select(["problem_id", "sample_id", "completion_token_ids"]).to_pylist())
    assert len(found["in_order"]) > 3
    flat = [r for chunk in found["in_order"] for r in chunk]
    assert [r["sample_id"] for r in flat] == [r["sample_id"] for r in in_order]  # every row once, in order
    pids = [[r["problem_id"] for r in chunk] for chunk in found["in_order"]]
    assert all(not set(a) & set(b) for a, b in zip(pids, pids[1:]))  # no problem split across chunks
    by_problem = lambda chunks: [sorted({r["problem_id"] for r in c}) for c in chunks]  # noqa: E731
    assert by_problem(found["shuffled"]) == by_problem(found["in_order"])
    for a, b in zip(found["shuffled"], found["in_order"]):  # within a problem: the input's relative order
        for pid in {r["problem_id"] for r in b}:
            expect = [r["sample_id"] for r in shuffled if r["problem_id"] == pid]
            assert [r["sample_id"] for r in a if r["problem_id"] == pid] == expect
            assert [r["sample_id"] for r in b if r["problem_id"] == pid] == [r["sample_id"] for r in in_order if r["problem_id"] == pid]


def test_rows_of_a_source_in_order_are_served_again_from_the_start(tmp_path):
    """A range before the last one served starts the read again (a second pass over the chunks works)."""
    rows = [_rollout(pid, j) for pid in PROBLEMS for j in range(3)]
    main, others = _outputs(tmp_path, "again", rows, part_rows=4)
    chunks = partition(main, others, 9, tmp_path / "work")
    first = [read_chunk(c["main"]).column("sample_id").to_pylist() for c in chunks]
    again = [read_chunk(c["main"]).column("sample_id").to_pylist() for c in chunks]
    assert first == again and sum(first, []) == [r["sample_id"] for r in rows]
    assert isinstance(read_chunk(chunks[1]["main"]), pa.Table)
