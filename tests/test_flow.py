"""The Prefect flow in-process against the session's server: retries from config."""

import pytest

import tasks.stages.curate as curate_mod
from flows.pipeline import pipeline
from tests.conftest import chain_sum


@pytest.fixture
def raw():
    return {"problems": {"sources": [chain_sum(20, 5, terms=None)]},
            "prefect": {"retries": 0, "retry_delay_seconds": 0}}


def _flaky(monkeypatch, failures):
    calls = []
    real = curate_mod.curate_parts

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) <= failures:
            raise RuntimeError("transient failure")
        return real(*a, **kw)

    monkeypatch.setattr(curate_mod, "curate_parts", flaky)
    return calls


def test_stage_retries_from_config_are_honoured(prefect_server, tmp_path, monkeypatch, raw):
    calls = _flaky(monkeypatch, failures=1)
    raw["prefect"]["stage_retries"] = {"curate": 1}
    out = pipeline(raw_config=raw, base_dir=str(tmp_path), workspace=str(tmp_path / "ws"), stages=["curate"])
    assert len(calls) == 2 and out["curate"]["status"] == "computed"


def test_failed_stage_raises_after_its_retries(prefect_server, tmp_path, monkeypatch, raw):
    calls = _flaky(monkeypatch, failures=5)
    with pytest.raises(RuntimeError, match="transient failure"):
        pipeline(raw_config=raw, base_dir=str(tmp_path), workspace=str(tmp_path / "ws"), stages=["curate"])
    assert len(calls) == 1
    assert not (tmp_path / "ws" / "store" / "curate").exists() or not any(
        p for p in (tmp_path / "ws" / "store" / "curate").iterdir() if not p.name.startswith(".")
    )


def test_bad_input_is_not_retried_a_transient_failure_is(prefect_server, tmp_path, monkeypatch, raw):
    """A stage failing on the user's input fails the same way again: no retry (and no retry delay) for it."""
    calls = []

    def bad_input(*a, **kw):
        calls.append(1)
        raise curate_mod.SourceError("problems.sources.0: yields no problems")

    monkeypatch.setattr(curate_mod, "curate_parts", bad_input)
    raw["prefect"]["retries"] = 2
    with pytest.raises(curate_mod.SourceError):
        pipeline(raw_config=raw, base_dir=str(tmp_path), workspace=str(tmp_path / "ws"), stages=["curate"])
    assert len(calls) == 1
    monkeypatch.undo()
    transient = _flaky(monkeypatch, failures=2)
    out = pipeline(raw_config=raw, base_dir=str(tmp_path), workspace=str(tmp_path / "ws2"), stages=["curate"])
    assert len(transient) == 3 and out["curate"]["status"] == "computed"


def test_bootstrap_flow_trains_and_reports_pass_at_k_by_level(prefect_server, tmp_path):
    import json

    from flows.bootstrap import bootstrap

    cfg = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "steps": 3, "batch_size": 4}
    info = bootstrap(out_dir=str(tmp_path / "tiny"), cfg=cfg, problems_per_level=3, n=4)
    saved = json.loads((tmp_path / "tiny" / "bootstrap.json").read_text())
    assert saved["eval"] == info["eval"]
    for kind in ("plain", "explain", "plain_with_derivation", "explain_with_derivation"):
        assert set(info["eval"][kind]) == {"easy", "hard"}
        assert {"pass@1", "pass@4"} <= set(info["eval"][kind]["easy"])
