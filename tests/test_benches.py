"""Every benchmark under bench/ runs at a tiny size, so none breaks unseen (its numbers mean nothing here: the
full-size runs are in bench/results/ and docs/benchmarks.md). bench/gpu.py has its own test (test_bench_gpu.py);
bench/learning.py's small version is tests/test_learning.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

TINY = {
    "fanout": ["--problems", "8", "--repeats", "1"],
    "judge": ["--traces", "16", "--concurrency", "4", "--delay", "0.01"],
    "nightly": ["--problems", "8", "--growth", "2", "--samples", "2", "--max-new-tokens", "8"],
    "rollouts": ["--problems", "2", "--samples", "2", "--max-new-tokens", "8", "--repeats", "1"],
    "served": ["--problems", "2", "--samples", "2", "--max-new-tokens", "8"],
    "update": ["--rows", "8", "--repeats", "1"],
    "scale": ["--n", "200", "--repeat", "1"],
    "failure_modes": ["--start", "--problems", "4", "--samples", "2"],
}
#: what each prints when it got to its comparison
SAYS = {"fanout": "grade", "judge": "ratio achieved/ideal", "nightly": "night 2", "rollouts": "of the stage", "served": "ratio",
        "update": "ratio ours/bare", "scale": "results:", "failure_modes": "too_many_steps"}


def _bench(name: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_every_bench_script_has_a_smoke_test():
    scripts = {p.stem for p in (ROOT / "bench").glob("*.py")}
    assert scripts == set(TINY) | {"token_steps", "gpu", "learning"}, scripts


@pytest.mark.parametrize("name", sorted(TINY))
def test_the_bench_runs_at_a_tiny_size(prefect_server, tmp_path, name):
    args = TINY[name] + (["--out", str(tmp_path / "scale.md")] if name == "scale" else [])
    proc = _bench(name, args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert SAYS[name] in proc.stdout, proc.stdout[-2000:]


@pytest.mark.slow
def test_the_token_steps_bench_runs_on_the_quickstarts_run(finished_quickstart):
    proc = _bench("token_steps", [str(finished_quickstart["workspace"]), finished_quickstart["run_id"]])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "tokens" in proc.stdout


def test_failure_modes_sorts_a_chain_sum_sample_into_one_mode():
    sys.path.insert(0, str(ROOT / "bench"))
    from failure_modes import classify

    q = "State the final answer to the following arithmetic problem: 3 + 4 - 2 ="
    assert classify(q, "3 + 4 = 7\n7 - 2 = 5\n\\boxed{5}", "5") == "right"
    assert classify(q, "3 + 4 = 7\n7 - 2 = 5\n5 + 1 = 6\n\\boxed{6}", "5") == "too_many_steps"
    assert classify(q, "3 + 4 = 7\n\\boxed{7}", "5") == "too_few_steps"
    assert classify(q, "3 + 4 = 7\n7 - 3 = 4\n\\boxed{4}", "5") == "wrong_term"
    assert classify(q, "3 + 4 = 8\n8 - 2 = 6\n\\boxed{6}", "5") == "arithmetic"
    assert classify(q, "3 + 4 = 7\n7 - 2 = 5\n\\boxed{9}", "5") == "answer"
    assert classify(q, "no idea", "5") == "other"
