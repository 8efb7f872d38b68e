"""The small version of bench/learning.py: every method runs a round and feeds its update what it should."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("learning_bench", ROOT / "bench" / "learning.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_small_learning_study_runs_every_method_with_its_own_training_signal(tmp_path, monkeypatch):
    monkeypatch.setenv("GUIDEDRL_PROGRESS", "0")
    bench = _bench()
    rows = bench.study(rounds=1, train_per_level=8, eval_per_level=8, samples=4, eval_samples=4, seed=0,
                       methods=list(bench.METHODS), workspace=tmp_path)
    by = {(r["method"], r["round"]): r for r in rows}
    assert set(by) == {(m, r) for m in bench.METHODS for r in (0, 1)}
    # the same start for everyone, measured on the same eval problems
    starts = {m: by[(m, 0)]["pass"] for m in bench.METHODS}
    assert all(p == starts["grpo"] for p in starts.values())
    assert starts["grpo"]["easy"]["pass@1"] > 0.8 and starts["grpo"]["hard"]["pass@4"] < 0.5
    # with the derivation checked, a sample counts only if its answer counts too (never more)
    for r in rows:
        for lvl, t in r["pass"].items():
            assert r["pass_with_derivation"][lvl]["pass@4"] <= t["pass@4"] and r["pass_with_derivation"][lvl]["n"] == t["n"]
    assert starts["grpo"]["easy"]["pass@1"] - by[("grpo", 0)]["pass_with_derivation"]["easy"]["pass@1"] < 0.1  # easy: right paths
    # what reaches each update: explanations only for ExPO, hinted samples only for LTE (when it unlocked any)
    assert by[("expo", 1)]["update"]["explain"] > 0
    assert all(by[(m, 1)]["update"]["explain"] == 0 for m in ("grpo", "lte", "exprl", "prefix", "self-hint"))
    # (prefix and self-hint samples train on-policy under the prompt they were shown: plain rows, never guided)
    assert all(by[(m, 1)]["update"]["guided"] == 0 for m in ("grpo", "expo", "exprl", "prefix", "self-hint"))
    # plain GRPO spends at least the guided methods' policy samples
    assert by[("grpo", 1)]["samples"] >= max(by[(m, 1)]["samples"] for m in ("expo", "lte"))
    # the frontier of each run: the round's stuck set, and what each guidance reached (only the guidance that ran)
    # (a method runs only the guidance its update reads: the others' columns are null)
    own = {"grpo": None, "expo": "explain", "lte": "hint", "exprl": "judge", "prefix": "prefix", "self-hint": "self_hint"}
    for m in bench.METHODS:
        fr = by[(m, 1)]["frontier"]
        assert 0 < fr["stuck"] <= fr["problems"] and fr["left_stuck"] == 0
        for g in ("explain", "hint", "prefix", "self_hint", "judge"):
            assert (fr[g] is not None) == (g == own[m]), (m, g, fr[g])
            assert fr[g] is None or fr[g] <= fr["stuck"]
    assert by[("exprl", 1)]["frontier"]["judge"] is not None
    # the stuck groups of each round's update, and those ExpRL's process grades give a token advantage
    e = by[("exprl", 1)]
    assert 0 <= e["all_fail_groups_with_token_advantages"] <= e["all_fail_groups"] == e["frontier"]["stuck"]
    assert by[("grpo", 1)]["all_fail_groups_with_token_advantages"] == 0  # verified rewards: no token advantages
    table = bench.table(rows, 4)
    assert table.count("\n") == 1 + len(rows) and "| expo | 0 | 1 |" in table
    summary, agg = bench.aggregate(rows + [{**r, "seed": 1} for r in rows], 4)
    assert "| expo | 1 | 2 |" in summary and agg[("grpo", 1)]["hard_pass_at_k"] == [by[("grpo", 1)]["pass"]["hard"]["pass@4"]] * 2
    bench.chart(agg, 4, tmp_path / "chart.png", "test")
    assert (tmp_path / "chart.png").stat().st_size > 1000


def test_tuning_chooses_per_method_the_best_stuck_rate_that_keeps_the_easy_level():
    """--tune: per method, the rate with the best validation stuck pass@k after the last round among those losing at
    most 2 points of easy pass@1; where no rate keeps the easy level, the best stuck pass@k, said so."""
    bench = _bench()

    def run(method, lr, hard, easy_end):
        start = {"method": method, "lr": lr, "round": 0, "pass": {"hard": {"pass@8": 0.1}, "easy": {"pass@1": 0.90}}}
        end = {"method": method, "lr": lr, "round": 2, "pass": {"hard": {"pass@8": hard}, "easy": {"pass@1": easy_end}},
               "pass_with_derivation": {"hard": {"pass@8": hard / 2}}}
        return [start, end]

    rows = (run("grpo", 1e-5, 0.20, 0.91) + run("grpo", 5e-5, 0.30, 0.885) + run("grpo", 2e-4, 0.50, 0.60)
            + run("expo", 1e-5, 0.20, 0.70) + run("expo", 5e-5, 0.40, 0.60))
    chosen, table = bench.choose(rows, 8)
    assert chosen == {"grpo": 5e-5, "expo": 5e-5}  # grpo 2e-4 is best on the stuck level but loses 30 points of easy
    assert "| grpo | 5e-05 | 0.300 | 0.150 | 0.885 | -0.015 | yes |" in table
    assert "yes (no rate kept the easy level)" in table
    # the final runs render apart from the tuning runs, with each method's rate
    final = [{**r, "phase": "final", "seed": 0, "samples": 0, "update": {}} for r in run("grpo", 5e-5, 0.3, 0.9)]
    md = bench.render([{**r, "phase": "tune"} for r in rows] + final, 8, "setting; x", None)
    assert md.index("Tuning") < md.index("Mean [min–max]") and "| grpo | 2 | 1 |" in md and "| 5e-05 |" in md
