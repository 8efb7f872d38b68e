"""Online GRPO rounds as Prefect subflows: a round killed mid-update resumes from that round."""

from pathlib import Path

import pytest

import tasks.stages.eval as eval_mod
import tasks.stages.grpo as grpo_mod
from flows.online import online
from tasks.core.store import StageOutput, Store
from tasks.report.runs import RunRecord
from tests.conftest import chain_sum

TINY = Path(__file__).resolve().parents[1] / "data" / "models" / "tiny-policy"


def _raw():
    levels = {"easy": {"min_digits": 1, "max_digits": 1}, "hard": {"min_digits": 2, "max_digits": 2}}
    return {
        "problems": {"sources": [chain_sum(8, 11 + i, lvl, **c)
                                 for i, (lvl, c) in enumerate(levels.items())],
                     "eval_fraction": 0.25},
        "policy": {"model": str(TINY), "batch_size": 64},
        "prompts": {"plain": "tiny_plain", "explain": "tiny_explain", "hint": "tiny_hint"},
        "rollouts": {"samples_per_problem": 4, "max_new_tokens": 40},
        "explain": {"samples_per_problem": 2},
        "train": {"grpo": {"learning_rate": 1e-4, "batch_size": 8}},
        "eval": {"samples_per_problem": 2},
        "prefect": {"retries": 0, "retry_delay_seconds": 0},
    }


def test_a_round_killed_mid_update_resumes_from_that_round(prefect_server, tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    real = grpo_mod.train_update
    calls = []

    def killed_in_round_2(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed mid-update")
        return real(*a, **kw)

    monkeypatch.setattr(grpo_mod, "train_update", killed_in_round_2)
    with pytest.raises(RuntimeError, match="killed mid-update"):
        online(raw_config=_raw(), base_dir=str(tmp_path), workspace=str(ws), rounds=2)
    store = Store(ws)
    assert len(store.outputs("grpo")) == 1  # round 1's checkpoint; round 2 left nothing half-written
    assert len(store.outputs("materialize")) == 2  # round 2 got as far as its datasets
    created = {o.path: o.manifest["created"] for o in store.outputs()}

    monkeypatch.setattr(grpo_mod, "train_update", real)
    measured = []
    real_eval = eval_mod.evaluate_policy
    monkeypatch.setattr(eval_mod, "evaluate_policy", lambda backend, *a: measured.append(backend.policy_id) or real_eval(backend, *a))
    rec = RunRecord.create(ws, "online", _raw(), str(tmp_path), [])
    history = online(raw_config=_raw(), base_dir=str(tmp_path), workspace=str(ws), rounds=2, run_record=str(rec.path))
    round1, round2 = (h["results"] for h in history)
    assert "grade" not in round1 and "rubric" not in round1 and "explain" in round1  # the update reads no grade (reward: verify)
    assert all(r["status"] != "computed" for r in round1.values())  # round 1: nothing redone
    assert {s for s, r in round2.items() if r["status"] == "computed"} == {"grpo", "eval"}  # round 2 resumed at the update
    assert len(calls) == 2  # the first run's two updates, the resumed one went to the real function
    assert all(o.manifest["created"] == created[o.path] for o in Store(ws).outputs() if o.path in created)
    # round 2's eval measured only its new checkpoint: its starting policy is round 1's checkpoint, measured in round 1
    assert len(measured) == 1 and round2["eval"]["summary"]["pass"]["base"] == round1["eval"]["summary"]["pass"]["grpo"]
    # round 2 started from round 1's checkpoint
    assert round2["rollouts"]["path"] != round1["rollouts"]["path"]
    assert history[0]["policy"] == round1["grpo"]["path"] + "/checkpoint"
    assert Store(ws).get("grpo", Path(round2["grpo"]["path"]).name).manifest["inputs"]["policy"] != \
        Store(ws).get("grpo", Path(round1["grpo"]["path"]).name).manifest["inputs"]["policy"]

    # after the last round: the run's frontier, recorded, and the report's charts of it and of eval by round
    rec = rec.close()
    front = rec.data["stages"]["frontier"]
    table = StageOutput.open(front["path"]).read("frontier")
    rolled = [Store(ws).get("rollouts", Path(r["rollouts"]["path"]).name).read("rollouts") for r in (round1, round2)]
    assert table.num_rows == sum(len(set(t["problem_id"].to_pylist())) for t in rolled)
    ids = [(t["problem_id"].to_pylist(), t["correct"].to_pylist()) for t in rolled]
    assert [r["stuck"] for r in front["summary"]["by_round"]] == [len(set(p) - {x for x, ok in zip(p, c) if ok}) for p, c in ids]
    assert (rec.dir / "frontier.png").is_file() and (rec.dir / "learning.png").is_file()


def test_the_kl_reference_is_the_initial_policy_in_every_round(tmp_path):
    """The papers measure the KL to π₀ for the whole run; `kl_reference: round` takes each round's starting policy."""
    from flows.online import round_config
    from tasks.registry import parse_config
    from tasks.stages.grpo import reference_dir

    raw = _raw()
    raw["train"]["grpo"]["kl"] = 0.001
    ckpt = tmp_path / "round-1-checkpoint"
    ckpt.mkdir()
    first = parse_config(round_config(raw, None, 1), base_dir=tmp_path)
    second = parse_config(round_config(raw, str(ckpt), 2), base_dir=tmp_path)
    assert reference_dir(first) == TINY and reference_dir(second) == TINY  # π₀ both times
    assert second.policy.model == str(ckpt)
    raw["train"]["grpo"]["kl_reference"] = "round"
    assert reference_dir(parse_config(round_config(raw, str(ckpt), 2), base_dir=tmp_path)) == ckpt
