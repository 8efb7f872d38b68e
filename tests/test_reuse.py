"""Nightly reuse: rows that do not depend on how the work is cut, and a night that samples only what changed
(tasks/core/reuse.py, tasks/models/sampling.py)."""

import json
from pathlib import Path

import pytest

import tasks.stages.rollouts as rollouts_mod
from tasks.core.store import Store
from tasks.models.transformers_backend import TransformersBackend
from tasks.stages import curate, explain, hint
from tasks.stages import filter as filter_stage
from tests.conftest import tiny_config, write_jsonl
from tests.sampled_rows import assert_same_rows

pytestmark = pytest.mark.slow  # end to end: nights of whole sampling stages compared row for row

TINY = Path(__file__).resolve().parents[1] / "data" / "models" / "tiny-policy"
def _problems(n: int, start: int = 0) -> list[dict]:
    """Chain sums: one-digit ones the tiny policy often solves, two-digit ones it is stuck on."""
    out = []
    for i in range(start, start + n):
        a, b = (i % 9 + 1, i // 9 + 1) if i % 3 else (10 + i, 37 + 2 * i)  # every one different
        out.append({"question": f"{a} + {b} =", "answer": str(a + b), "level": "easy" if i % 3 else "hard"})
    return out


def _config(tmp_path: Path, problems: list[dict], **over) -> "object":
    f = write_jsonl(tmp_path / f"problems-{len(problems)}-{abs(hash(json.dumps(problems))) % 10**8}.jsonl", problems)
    return tiny_config(tmp_path, checkpoint=over.pop("model", TINY), problems={"sources": [{"file": str(f)}], "eval_fraction": 0.0},
                       prompts={"plain": over.pop("plain", "tiny_plain")},
                       rollouts={"samples_per_problem": 3, "max_new_tokens": 20, "shard_size": 8, **over.pop("rollouts", {})},
                       explain={"problems": "all", "samples_per_problem": 2, "shard_size": 8, **over.pop("explain", {})},
                       hint={"samples_per_problem": 2, "shard_size": 8, **over.pop("hint", {})})


@pytest.fixture
def sampled(monkeypatch):
    """The prompts each call of the in-process backend sampled (one list per call)."""
    calls: list[list[str]] = []
    real = TransformersBackend.generate

    def counting(self, prompts, params, seeds=None):
        calls.append(list(prompts))
        return real(self, prompts, params, seeds)

    monkeypatch.setattr(TransformersBackend, "generate", counting)
    return calls


def _night(config, ws: Path, stages=("rollouts", "explain", "hint")) -> dict:
    store = Store(ws)
    cur, _ = curate.STAGE.run(config, store)
    outs = {"curate": cur}
    outs["rollouts"], _ = rollouts_mod.STAGE.run(config, store, {"curate": cur})
    if "explain" in stages or "hint" in stages:
        outs["filter"], _ = filter_stage.STAGE.run(config, store, {"curate": cur, "rollouts": outs["rollouts"]})
        up = {k: outs[k] for k in ("curate", "rollouts", "filter")}
        outs["explain"], _ = explain.STAGE.run(config, store, up)
        outs["hint"], _ = hint.STAGE.run(config, store, up)
    return outs


DATASET = {"rollouts": "rollouts", "explain": "explanations", "hint": "hints"}


def test_rows_do_not_depend_on_shard_size(tmp_path):
    """Three shard sizes (one problem a shard, 7, all in one): the same rollouts, explanations and hinted samples."""
    problems = _problems(20)
    runs = [_night(_config(tmp_path, problems, rollouts={"shard_size": s}, explain={"shard_size": s}, hint={"shard_size": s}),
                   tmp_path / f"ws{s}") for s in (1, 7, 50)]
    first = runs[0]
    assert first["rollouts"].summary["samples"] == 60 and first["explain"].summary["kept"] > 0 and first["hint"].summary["hinted_problems"] > 0
    for other in runs[1:]:
        for stage, dataset in DATASET.items():
            assert_same_rows(other[stage].read(dataset), first[stage].read(dataset))


def test_night_two_samples_only_the_new_problems_and_equals_a_run_from_scratch(tmp_path, sampled):
    """Night 1: 48 problems; night 2: 50 (+4 %, new ids falling between old ones). Night 2 samples only the new
    problems (counted at the backend) and its rows equal a from-scratch run of night 2's config, row for row."""
    night1, night2 = _problems(48), _problems(48) + _problems(2, start=48)
    ws = tmp_path / "nightly"
    _night(_config(tmp_path, night1), ws)
    sampled.clear()
    second = _night(_config(tmp_path, night2), ws)
    new_questions = {p["question"] for p in _problems(2, start=48)}
    asked = [p for call in sampled for p in call]
    assert asked and all(any(q in p for q in new_questions) for p in asked), asked  # nothing but the new problems
    s = {stage: second[stage].summary for stage in DATASET}
    assert (s["rollouts"]["sampled_problems"], s["rollouts"]["reused_problems"]) == (2, 48)
    assert s["explain"]["sampled_problems"] == 2 and s["explain"]["reused_problems"] == 48
    assert s["hint"]["sampled_problems"] + s["hint"]["reused_problems"] == s["hint"]["hinted_problems"]
    assert s["hint"]["sampled_problems"] <= 2
    assert "problems sampled 2, reused 48" in rollouts_mod.describe(s["rollouts"])

    sampled.clear()
    scratch = _night(_config(tmp_path, night2), tmp_path / "scratch")
    assert sum(map(len, sampled)) > 50  # the from-scratch run sampled everything
    for stage, dataset in DATASET.items():
        assert second[stage].summary["sampled_problems"] + second[stage].summary["reused_problems"] == \
            scratch[stage].summary["sampled_problems"]
        assert_same_rows(second[stage].read(dataset), scratch[stage].read(dataset))
        for key in ("samples", "problems", "pass", "kept", "sampled", "unlocked_problems", "hinted_problems"):
            assert second[stage].summary.get(key) == scratch[stage].summary.get(key), (stage, key)


@pytest.mark.parametrize("change", ["policy", "template", "temperature", "max_new_tokens", "version", "seed"])
def test_a_change_that_changes_the_rows_reuses_nothing(tmp_path, random_checkpoint, monkeypatch, change):
    problems = _problems(12)
    ws = tmp_path / "ws"
    _night(_config(tmp_path, problems, rollouts={"max_new_tokens": 6}), ws, stages=("rollouts",))
    over = {"rollouts": {"max_new_tokens": 6}}
    if change == "policy":
        over["model"] = random_checkpoint
    elif change == "template":
        (tmp_path / "asked.txt").write_text("Q: $question")
        over["plain"] = str(tmp_path / "asked.txt")
    elif change == "temperature":
        over["rollouts"]["temperature"] = 0.7
    elif change == "max_new_tokens":
        over["rollouts"]["max_new_tokens"] = 7
    elif change == "seed":
        over["rollouts"]["seed"] = 1
    else:
        import dataclasses

        monkeypatch.setattr(rollouts_mod, "STAGE", dataclasses.replace(rollouts_mod.STAGE, version=rollouts_mod.STAGE.version + "-next"))
    out = _night(_config(tmp_path, problems, **over), ws, stages=("rollouts",))["rollouts"]
    assert (out.summary["sampled_problems"], out.summary["reused_problems"]) == (12, 0)
    same = _night(_config(tmp_path, problems, rollouts={"max_new_tokens": 6, "shard_size": 5}), ws, stages=("rollouts",))["rollouts"]
    assert (same.summary["sampled_problems"], same.summary["reused_problems"]) == (0, 12)  # what was sampled, in other shards


def test_a_forced_run_and_a_failed_generation_reuse_nothing(tmp_path):
    problems = _problems(6)
    config = _config(tmp_path, problems, rollouts={"max_new_tokens": 6})
    store = Store(tmp_path / "ws")
    cur, _ = curate.STAGE.run(config, store)
    rollouts_mod.STAGE.run(config, store, {"curate": cur})
    forced, _ = rollouts_mod.STAGE.run(config, store, {"curate": cur}, force=True)
    assert forced.summary["sampled_problems"] == 6 and forced.summary["reused_problems"] == 0


def test_gc_keeps_the_outputs_the_next_night_reuses(tmp_path, sampled):
    """Night 1 samples problems A ∪ B, night 2 only B ∪ C; gc --keep 1 keeps night 2's outputs and night 1's
    rollouts (the newest rows of A); night 3 (A ∪ B ∪ C) samples nothing."""
    from tasks.report.runs import RunRecord, gc

    a, b, c = _problems(4), _problems(4, start=4), _problems(4, start=8)
    ws = tmp_path / "ws"

    def night(problems, run_id):
        outs = _night(_config(tmp_path, problems, rollouts={"max_new_tokens": 6}), ws, stages=("rollouts",))
        rec = RunRecord.create(ws, "run", {}, str(tmp_path), list(outs), run_id=run_id)
        for stage, out in outs.items():
            rec.stage_finished(stage, {"status": "computed", "key": out.key, "path": str(out.path)})
        rec.finish("completed")
        return outs

    first = night(a + b, "20261201-010000-aaaaa1")
    second = night(b + c, "20261202-010000-aaaaa2")
    assert second["rollouts"].summary["reused_problems"] == 4
    done = gc(ws, keep=1)
    assert first["rollouts"].path.exists() and str(first["rollouts"].path.resolve()) in done["outputs_kept_for_reuse"]
    assert not first["curate"].path.exists()  # nothing to reuse there
    sampled.clear()
    third = night(a + b + c, "20261203-010000-aaaaa3")
    assert (third["rollouts"].summary["sampled_problems"], third["rollouts"].summary["reused_problems"]) == (0, 12)
    assert sampled == []
    # once night 3 holds every row, night 1's and night 2's rollouts go
    gc(ws, keep=1)
    assert not first["rollouts"].path.exists() and not second["rollouts"].path.exists() and third["rollouts"].path.exists()


def test_eval_samples_only_the_eval_problems_it_has_not_measured(tmp_path, sampled):
    """eval keeps per problem only its verdicts: a grown eval split samples the new problems alone, and its pass
    table is that of a from-scratch eval."""
    from tasks.stages import eval as eval_mod

    def run(problems, ws):
        config = _config(tmp_path, problems, rollouts={"max_new_tokens": 12})
        config = config.model_copy(update={"problems": config.problems.model_copy(update={"eval_fraction": 0.6})})
        store = Store(ws)
        return eval_mod.STAGE.run(config, store, {"curate": curate.STAGE.run(config, store)[0]})[0]

    first = run(_problems(20), tmp_path / "ws")
    assert first.summary["sampled_problems"] == first.summary["problems"] > 5 and first.summary["reused_problems"] == 0
    sampled.clear()
    grown = run(_problems(26), tmp_path / "ws")
    new = grown.summary["problems"] - first.summary["problems"]
    assert new > 0 and (grown.summary["sampled_problems"], grown.summary["reused_problems"]) == (new, first.summary["problems"])
    assert sum(map(len, sampled)) == new  # only the new eval problems' prompts went to the policy
    scratch = run(_problems(26), tmp_path / "scratch")
    assert grown.summary["pass"] == scratch.summary["pass"]
    assert f"(policy, problem) pairs sampled {new}, reused {first.summary['problems']}" in eval_mod.describe(grown.summary)
