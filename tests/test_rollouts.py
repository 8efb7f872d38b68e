import pytest

import tasks.core.shards as shards_mod
import tasks.stages.rollouts as rollouts_mod
from tasks.core.store import Store
from tasks.registry import parse_config
from tasks.core.metrics import pass_at_k, pass_table
from tasks.stages import curate
from tasks.stages import filter as filter_stage
from tests.conftest import chain_sum, tiny_config


def _config(checkpoint, **rollouts):
    return tiny_config(checkpoint=checkpoint, problems={"sources": [chain_sum(30, 2, "easy", digits=1)], "eval_fraction": 0.0},
                       rollouts={"samples_per_problem": 3, "max_new_tokens": 8, "shard_size": 7, **rollouts})


def _run_all(config, ws):
    store = Store(ws)
    cur, _ = curate.STAGE.run(config, store)
    out, reused = rollouts_mod.STAGE.run(config, store, {"curate": cur})
    return store, cur, out, reused


def test_pass_at_k_estimator():
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # 1 - C(3,3)/C(5,3)
    t = pass_table({"a": ("x", [True, False]), "b": ("x", [False, False]), "c": ("y", [True, True])})
    assert t["x"] == {"problems": 2, "n": 2, "all_fail": 1, "pass@1": 0.25, "pass@2": 0.5}
    assert t["all"]["problems"] == 3


def test_rollout_rows_and_summary(tmp_path, random_checkpoint):
    config = _config(random_checkpoint)
    store, cur, out, reused = _run_all(config, tmp_path / "ws")
    assert not reused
    t = out.read("rollouts")
    n = cur.read("problems").num_rows
    assert n > 20 and t.num_rows == n * 3
    rows = t.to_pylist()
    assert len({r["sample_id"] for r in rows}) == t.num_rows
    assert all(r["prompt_kind"] == "plain" and r["loss_prompt"] == r["prompt"] and r["loss_logprobs"] == r["behaviour_logprobs"] for r in rows)
    assert all(len(r["completion_token_ids"]) == len(r["behaviour_logprobs"]) for r in rows)
    assert {r["prompt"].startswith("<|user|>State the final answer") for r in rows} == {True}
    s = out.summary
    assert s["problems"] == n and s["pass"]["easy"]["n"] == 3 and "pass@3" in s["pass"]["easy"]
    assert s["all_fail_problems"] == sum(1 for pid in {r["problem_id"] for r in rows}
                                         if not any(r["correct"] for r in rows if r["problem_id"] == pid))
    assert not any(p.name.startswith(".work-") for p in (store.root / "rollouts").iterdir())
    again = rollouts_mod.STAGE.run(config, store, {"curate": cur})
    assert again[1] is True and again[0].path == out.path


def test_killed_rollout_resumes_with_exactly_the_rows_of_an_uninterrupted_run(tmp_path, random_checkpoint, monkeypatch):
    config = _config(random_checkpoint)
    _, _, clean, _ = _run_all(config, tmp_path / "clean")
    expected = clean.read("rollouts")

    real = shards_mod.write_shard
    written = []

    def crash_after_two(path, table, *rest):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")  # not an Exception: nothing may catch it
        real(path, table, *rest)
        written.append(path.name)

    monkeypatch.setattr(shards_mod, "write_shard", crash_after_two)
    store = Store(tmp_path / "crash")
    cur, _ = curate.STAGE.run(config, store)
    with pytest.raises(KeyboardInterrupt):
        rollouts_mod.STAGE.run(config, store, {"curate": cur})
    assert store.outputs("rollouts") == []
    (work,) = [p for p in (store.root / "rollouts").iterdir() if p.name.startswith(".work-")]
    assert sorted(p.name for p in work.glob("shard-*.parquet")) == ["shard-00000.parquet", "shard-00001.parquet"]

    monkeypatch.setattr(shards_mod, "write_shard", lambda p, t, *rest: (written.append(p.name), real(p, t, *rest)))
    written.clear()
    out, _ = rollouts_mod.STAGE.run(config, store, {"curate": cur})
    shards = -(-cur.read("problems").num_rows // 7)
    assert shards >= 4
    assert written == [f"shard-{i:05d}.parquet" for i in range(2, shards)]  # only the unfinished ones
    got = out.read("rollouts")
    assert got.num_rows == expected.num_rows
    assert got.equals(expected)
    assert out.fingerprints == clean.fingerprints


def test_two_runs_of_one_output_at_once_compute_it_once(tmp_path, random_checkpoint, monkeypatch):
    """The second run waits on the store's lock on the output, then reuses the first one's."""
    import threading

    config = _config(random_checkpoint)
    store = Store(tmp_path / "ws")
    cur, _ = curate.STAGE.run(config, store)
    real, written = shards_mod.write_shard, []
    real_lock, both_at_lock, arrived = Store.lock, threading.Event(), []

    def lock(self, stage, key):
        if stage == "rollouts":
            arrived.append(key)
            if len(arrived) == 2:
                both_at_lock.set()
        return real_lock(self, stage, key)

    def slow_write(path, table, *rest):
        assert both_at_lock.wait(60)  # the other run has come to the lock while this one is mid-stage
        real(path, table, *rest)
        written.append(path.name)

    monkeypatch.setattr(Store, "lock", lock)
    monkeypatch.setattr(shards_mod, "write_shard", slow_write)
    start, results, errors = threading.Barrier(2), [], []

    def go():
        start.wait()
        try:
            results.append(rollouts_mod.STAGE.run(config, Store(tmp_path / "ws"), {"curate": cur}))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(reused for _, reused in results) == [False, True]  # one computed it, the other reused it
    assert results[0][0].path == results[1][0].path
    shards = -(-cur.read("problems").num_rows // 7)
    assert sorted(written) == [f"shard-{i:05d}.parquet" for i in range(shards)]  # every shard written once
    assert [p.name for p in (store.root / "rollouts").iterdir() if not p.name.startswith(".lock-")] == [results[0][0].key]


def test_filter_keeps_the_band_and_records_every_rate():
    problems = [{"problem_id": p, "question": p, "answer": "1", "reference_solution": None, "source": "s",
                 "level": "easy", "split": "train", "metadata": "{}"} for p in "abcd"]
    rows = []
    for pid, results in {"a": [0, 0, 0], "b": [1, 0, 0], "c": [1, 1, 1], "d": [None, None, 0]}.items():
        for r in results:
            rows.append({"problem_id": pid, "level": "easy", "finish_reason": "error" if r is None else "stop", "correct": bool(r)})
    import polars as pl

    kept, table = filter_stage.filter_problems(pl.LazyFrame(problems), pl.LazyFrame(rows), 0.0, 0.0)
    assert kept.column("problem_id").to_pylist() == ["a", "d"]
    assert kept.column_names == list(problems[0]) + ["pass_rate"]
    rates = {t["problem_id"]: (t["n"], t["num_correct"], t["pass_rate"], t["kept"]) for t in table.to_pylist()}
    assert rates == {"a": (3, 0, 0.0, True), "b": (3, 1, 1 / 3, False), "c": (3, 3, 1.0, False), "d": (1, 0, 0.0, True)}
    kept, _ = filter_stage.filter_problems(pl.LazyFrame(problems), pl.LazyFrame(rows), 0.3, 1.0)
    assert kept.column("problem_id").to_pylist() == ["b", "c"]


def _served_config(server, checkpoint, **policy):
    return parse_config({
        "problems": {"sources": [chain_sum(30, 2, "easy", digits=1)],
                     "eval_fraction": 0.0},
        "policy": {"backend": "openai", "model": "served-tiny", "base_url": server.base_url, "tokenizer": str(checkpoint),
                   "max_retries": 1, "timeout_seconds": 5, "concurrency": 4, **policy},
        "prompts": {"plain": "tiny_plain"},
        "rollouts": {"samples_per_problem": 2, "max_new_tokens": 3, "shard_size": 8},
    })


def test_a_failed_generation_is_never_data_and_the_rerun_regenerates_only_what_failed(tmp_path, random_checkpoint):
    """Prompts that fail after the client's retries fail the stage (policy.max_error_fraction 0): one error naming the
    server, the count and the first error; nothing published; the shards without errors are kept, and the re-run with
    the server fixed asks only for the failed shards' prompts and ends with the rows of an uninterrupted run."""
    from tasks.core.shards import GenerationFailed
    from tests.openai_server import OpenAIServer

    with OpenAIServer() as server:
        server.behaviour.always_fail = "+ 3 ="  # every problem whose question ends in "+ 3 =" fails for good
        config = _served_config(server, random_checkpoint)
        store = Store(tmp_path / "ws")
        cur, _ = curate.STAGE.run(config, store)
        problems = cur.read("problems").to_pylist()
        failing = {p["problem_id"] for p in problems if p["question"].endswith("+ 3 =")}
        assert failing and len(failing) < len(problems)  # the test covers both kinds of problem
        with pytest.raises(GenerationFailed) as err:
            rollouts_mod.STAGE.run(config, store, {"curate": cur})
        msg = str(err.value)
        assert server.base_url in msg and f"failed for {len(failing)} of {len(problems)} prompts" in msg and "InternalServerError" in msg
        assert store.outputs("rollouts") == []  # nothing published
        [work] = (store.root / "rollouts").glob(".work-*")
        kept = sorted(p.name for p in work.glob("shard-*.parquet"))
        failed = sorted(p.name for p in work.glob("shard-*.failed.json"))
        assert kept and failed and len(kept) + len(failed) == -(-len(problems) // 8)

        server.behaviour.always_fail = "NEVER"  # the server is fixed
        asked_before = len(server.behaviour.requests)
        out, _ = rollouts_mod.STAGE.run(config, store, {"curate": cur})
        again = [r for r in server.behaviour.requests[asked_before:] if isinstance(r.get("prompt"), str) and "<|user|>" in r["prompt"]]
        assert len({r["prompt"] for r in again}) == 8 * len(failed)  # only the failed shards' problems (8 a shard) were sampled again
        fresh, _, whole, _ = _run_all(config, tmp_path / "fresh")
    key = lambda r: r["sample_id"]  # noqa: E731
    assert sorted(out.read("rollouts").to_pylist(), key=key) == sorted(whole.read("rollouts").to_pylist(), key=key)
    assert out.summary["errors"] == 0 and out.summary["finish_reasons"] == {"stop": 2 * len(problems)}


def test_tolerated_failures_are_counted_apart_and_left_out_of_pass_rates(tmp_path, random_checkpoint):
    """Within policy.max_error_fraction the failed rows are kept as errors: counted apart (summary and pass table), left
    out of pass@k and of the filter's rates."""
    from tests.openai_server import OpenAIServer

    with OpenAIServer() as server:
        server.behaviour.always_fail = "+ 3 ="
        config = _served_config(server, random_checkpoint, max_error_fraction=0.5)
        store, cur, out, _ = _run_all(config, tmp_path / "ws")
        rates = filter_stage.STAGE.run(config, store, {"curate": cur, "rollouts": out})[0].read("pass_rates").to_pylist()
    rows = out.read("rollouts").to_pylist()
    problems = cur.read("problems").to_pylist()
    failing = {p["problem_id"] for p in problems if p["question"].endswith("+ 3 =")}
    assert len(rows) == 2 * len(problems)
    for r in rows:
        assert r["prompt"].startswith("<|user|>") and r["policy_id"] == "openai:served-tiny"
        if r["problem_id"] in failing:
            assert r["finish_reason"] == "error" and r["error"] and r["behaviour_logprobs"] is None and not r["correct"]
        else:
            assert r["finish_reason"] == "stop" and r["error"] is None and len(r["completion_token_ids"]) == 3
    s = out.summary
    assert s["errors"] == 2 * len(failing) and s["pass"]["easy"]["errors"] == 2 * len(failing)
    assert s["pass"]["easy"]["problems"] == len(problems) - len(failing)  # failed ones are no wrong answers
    assert all(r["n"] == 0 and r["pass_rate"] is None for r in rates if r["problem_id"] in failing)


def test_problems_whose_prompt_is_over_max_prompt_tokens_are_left_out_and_counted(tmp_path, random_checkpoint):
    """`rollouts.max_prompt_tokens` (ExpRL: 4096; verl's filter_overlong_prompts): a prompt longer than the limit,
    counted in the policy's tokenizer with the chat template applied, gets no samples; the summary counts it."""
    from transformers import AutoTokenizer

    from tasks.models.policy import render
    from tasks.models.prompts import fill, load_template

    def config(**rollouts):  # 1- and 2-digit terms: prompts of several lengths
        raw = _config(random_checkpoint, **rollouts).model_dump(mode="json", exclude_unset=True)
        raw["problems"]["sources"][0]["reasoning_gym"]["config"]["max_digits"] = 2
        return parse_config(raw)

    whole = config()
    _, cur, all_out, _ = _run_all(whole, tmp_path / "ws")
    tok = AutoTokenizer.from_pretrained(str(random_checkpoint))
    template = load_template(whole.template_path("plain"))
    lengths = {p["problem_id"]: len(tok(render(tok, fill(template, p["question"])), add_special_tokens=False)["input_ids"])
               for p in cur.read("problems").to_pylist()}
    limit = min(lengths.values())  # the shortest prompts are kept, the longer ones left out
    longer = {pid for pid, n in lengths.items() if n > limit}
    assert 0 < len(longer) < len(lengths)
    _, _, cut, _ = _run_all(config(max_prompt_tokens=limit), tmp_path / "ws")
    kept = {r["problem_id"] for r in cut.read("rollouts").to_pylist()}
    assert kept == set(lengths) - longer and cut.summary["prompts_over_max"] == len(longer)
    assert f"{len(longer)} problems left out (prompt over rollouts.max_prompt_tokens)" in rollouts_mod.describe(cut.summary)
    # the problems kept have the rows of the run without a limit (their seeds do not depend on the others)
    same = [r for r in all_out.read("rollouts").to_pylist() if r["problem_id"] in kept]
    assert [r["completion"] for r in cut.read("rollouts").to_pylist()] == [r["completion"] for r in same]
