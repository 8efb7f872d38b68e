"""Every bad input ends one of two ways, and loses nothing.

One parametrized test over the bad inputs a user gives `guidedrl` (files, configs,
models, judge endpoints, shared datasets, the workspace, the disk). Each case
ends either

- **error**: exit code 1 and exactly one `error:` line naming the file (and line)
  or the config key, no Python traceback (`--debug` keeps them); a case marked
  ``before_flow`` is caught before the Prefect flow starts (no run record is made);
- **rejected**: the run succeeds and the bad row is in curate's `rejected` dataset
  with its reason;
- **accepted**: the input is fine after all (UTF-8 with a BOM, CRLF line ends, a
  429 with Retry-After that clears).

In every case the workspace's earlier outputs (curate and rollouts of a good
config) are still there with the same fingerprints, and the store holds no
half-written temporaries.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.openai_server import OpenAIServer

ROOT = Path(__file__).resolve().parents[1]
PROBLEMS = [{"question": f"What is {a} + {b}?", "answer": str(a + b), "reference_solution": f"{a} + {b} = {a + b}"}
            for a, b in [(1, 2), (3, 4), (5, 1), (2, 2), (7, 1), (4, 4), (6, 3), (8, 1)]]


def _base_config() -> dict:
    return {
        "workspace": "./ws",
        "problems": {"sources": [{"file": "problems.jsonl"}], "eval_fraction": 0.0},
        "policy": {"model": str(ROOT / "data" / "models" / "tiny-policy"), "batch_size": 64},
        "prompts": {"plain": "tiny_plain", "explain": "tiny_explain", "hint": "tiny_hint"},
        "rollouts": {"samples_per_problem": 2, "max_new_tokens": 16},
        "prefect": {"retries": 0},
    }


@pytest.fixture(scope="module")
def base(prefect_server, tmp_path_factory):
    """A workspace with curate and rollouts of a good config: what no bad input may touch."""
    d = tmp_path_factory.mktemp("bad-input-base")
    with open(d / "problems.jsonl", "w") as fh:
        for r in PROBLEMS:
            fh.write(json.dumps(r) + "\n")
    (d / "config.yaml").write_text(yaml.safe_dump(_base_config()))
    proc = _guidedrl(d, "run", "config.yaml", "--stages", "curate,rollouts")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return d


def _guidedrl(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("guidedrl")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "flows.cli"]
    return subprocess.run(cmd + list(args), cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


@dataclass
class Case:
    #: prepares the case in the work directory (a copy of the base); returns the changes to the config
    setup: Callable[[Path], dict]
    outcome: str  # error | rejected | accepted
    #: error: fragments the one error line must hold; rejected: the reason's prefix
    expect: tuple[str, ...] = ()
    stages: str = "curate"
    before_flow: bool = False
    command: tuple[str, ...] = ()  # another command than `run config.yaml --stages ...`
    env: dict = field(default_factory=dict)
    server: dict | None = None  # an OpenAI-compatible judge endpoint with this Behaviour


def _source(name: str, data: bytes, **src) -> Callable[[Path], dict]:
    def setup(d: Path) -> dict:
        (d / name).write_bytes(data)
        return {"problems": {"sources": [{"file": name, **src}]}}
    return setup


def _jsonl(rows, eol="\n") -> bytes:
    return "".join(json.dumps(r) + eol for r in rows).encode()


GOOD = PROBLEMS[:4]


def _parquet(d: Path, name: str, table: pa.Table) -> None:
    pq.write_table(table, d / name)


def _wrong_types(d: Path) -> dict:
    _parquet(d, "p.parquet", pa.table({"question": pa.array([[1, 2]] + [[3]] * 3, pa.list_(pa.int64())),
                                       "answer": ["3", "7", "6", "4"]}))
    _parquet(d, "good.parquet", pa.table({"question": [r["question"] for r in GOOD], "answer": [r["answer"] for r in GOOD]}))
    return {"problems": {"sources": [{"file": "good.parquet"}, {"file": "p.parquet", "allow_empty": True}]}}


def _truncated(d: Path) -> dict:
    _parquet(d, "p.parquet", pa.table({"question": [r["question"] for r in GOOD], "answer": [r["answer"] for r in GOOD]}))
    raw = (d / "p.parquet").read_bytes()
    (d / "p.parquet").write_bytes(raw[: len(raw) // 2])
    return {"problems": {"sources": [{"file": "p.parquet"}]}}


def _yaml_error(d: Path) -> dict:
    (d / "config.yaml").write_text("problems:\n  sources: [\n    - file: x\n")
    return {}


def _no_tokenizer(d: Path) -> dict:
    model = d / "model"
    shutil.copytree(ROOT / "data" / "models" / "tiny-policy", model)
    for f in model.glob("tokenizer*"):
        f.unlink()
    return {"policy": {"model": "model"}}


def _judge(d: Path) -> dict:
    return {"judge": {"backend": "openai", "rubric": True, "model": "judge", "base_url": "{server}", "max_retries": 1,
                      "timeout_seconds": 10, "max_failed_fraction": 0.0}}


def _closed_port(d: Path) -> dict:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {"judge": {**_judge(d)["judge"], "base_url": f"http://127.0.0.1:{port}/v1"}}


def _published(tamper: Callable[[Path], None]) -> Callable[[Path], dict]:
    def setup(d: Path) -> dict:
        from tasks.core.store import Store

        [out] = Store(d / "ws").outputs("curate")
        shutil.copytree(out.path / "problems", d / "published")
        tamper(d / "published")
        return {}
    return setup


def _outside(pub: Path) -> None:
    m = json.loads((pub / "manifest.json").read_text())
    m["files"] = ["../../evil.parquet"]
    (pub / "manifest.json").write_text(json.dumps(m))


def _changed(pub: Path) -> None:
    [f] = list((pub / "data").glob("*.parquet"))
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))


def _new_source(d: Path) -> dict:
    (d / "more.jsonl").write_bytes(_jsonl(GOOD))
    return {"problems": {"sources": [{"file": "more.jsonl"}]}}


CASES = {
    "utf16-text": Case(_source("p.jsonl", _jsonl(GOOD).decode().encode("utf-16")), "error", ("p.jsonl", "UTF-16"), before_flow=True),
    "latin1-byte": Case(_source("p.jsonl", _jsonl(GOOD[:2]) + b'{"question": "Caf\xe9 bill: 3 + 4?", "answer": "7"}\n'),
                        "error", ("p.jsonl", "line 3", "not UTF-8"), before_flow=True),
    "utf8-bom": Case(_source("p.jsonl", b"\xef\xbb\xbf" + _jsonl(GOOD)), "accepted"),
    "crlf-csv": Case(_source("p.csv", ("question,answer\r\n" + "".join(f'"{r["question"]}",{r["answer"]}\r\n' for r in GOOD)).encode()), "accepted"),
    "empty-file": Case(_source("p.jsonl", b""), "error", ("problems.sources.0", "yields no problems")),
    "header-only-csv": Case(_source("p.csv", b"question,answer\n"), "error", ("problems.sources.0", "yields no problems", "0 rows read")),
    "json-list-in-jsonl": Case(_source("p.jsonl", _jsonl(GOOD) + (json.dumps(GOOD) + "\n").encode()), "rejected",
                               ("unparseable: line 5: a JSON list, expected an object",)),
    "mapping-names-missing-column": Case(_source("p.jsonl", _jsonl(GOOD), columns={"question": "prompt"}), "error",
                                         ("p.jsonl", "'prompt'"), before_flow=True),
    "every-answer-null": Case(_source("p.jsonl", _jsonl([{"question": r["question"], "answer": None} for r in GOOD])), "error",
                              ("problems.sources.0", "yields no problems", "no_answer: 4")),
    "no-train-problems": Case(_source("p.jsonl", _jsonl(GOOD), split="eval"), "error", ("no train problems after curation", "4 eval")),
    "ten-mb-question": Case(_source("p.jsonl", _jsonl(GOOD + [{"question": "What is " + "1 + " * 2_500_000 + "1?", "answer": "x"}])),
                            "rejected", ("too_long: the question has 10,000,010 characters",)),
    "parquet-wrong-types": Case(_wrong_types, "rejected", ("bad_type: question is a list, not text",)),
    "truncated-parquet": Case(_truncated, "error", ("p.parquet", "cannot be read as Parquet"), before_flow=True),
    "missing-file": Case(lambda d: {"problems": {"sources": [{"file": "nowhere.jsonl"}]}}, "error",
                         ("nowhere.jsonl", "problem file not found", "problems.sources.0.file"), before_flow=True),
    "unknown-config-key": Case(lambda d: {"rollouts": {"temprature": 0.7}}, "error", ("config.yaml", "rollouts.temprature"), before_flow=True),
    "out-of-range-value": Case(lambda d: {"rollouts": {"temperature": -1}}, "error", ("config.yaml", "rollouts.temperature"), before_flow=True),
    "yaml-syntax-error": Case(_yaml_error, "error", ("config.yaml: line 3, column 5: not valid YAML",), before_flow=True),
    "missing-model-directory": Case(lambda d: {"policy": {"model": "no-such-model"}}, "error", ("no-such-model", "policy.model"),
                                    stages="rollouts", before_flow=True),
    "model-without-tokenizer": Case(_no_tokenizer, "error", ("model", "no usable tokenizer", "policy.model"), stages="rollouts", before_flow=True),
    "judge-refuses-connections": Case(_closed_port, "error", ("stage rubric failed", "APIConnectionError"), stages="rubric"),
    "judge-answers-401": Case(_judge, "error", ("rubric", "401"), stages="rubric", server={"refuse_status": 401}),
    "judge-answers-429-retry-after": Case(_judge, "accepted", stages="rubric", server={"rate_limit_first": 1, "retry_after": 1}),
    "judge-answers-html": Case(_judge, "error", ("rubric",), stages="rubric", server={"html": True}),
    "pull-path-outside": Case(_published(_outside), "error", ("published", "evil.parquet"),
                              command=("datasets", "pull", "published", "pulled")),
    "pull-changed-bytes": Case(_published(_changed), "error", ("published", "fingerprint"), command=("datasets", "pull", "published", "pulled")),
    "read-only-workspace": Case(_new_source, "error", ("ws", "cannot be written"), before_flow=True),
    "disk-full-while-writing": Case(_new_source, "error", ("curate", "No space left on device"),
                                    env={"GUIDEDRL_FAULT": "store.write.part@curate=enospc"}),
}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
    return out


def _fill(obj, url: str):
    if isinstance(obj, dict):
        return {k: _fill(v, url) for k, v in obj.items()}
    return obj.replace("{server}", url) if isinstance(obj, str) else obj


@contextlib.contextmanager
def _read_only(path: Path):
    """``path`` made unwritable (chmod; as root, the immutable attribute); skip if this machine cannot."""
    if os.geteuid() == 0:
        ok = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
        undo = ["chattr", "-i", str(path)]
    else:
        path.chmod(0o555)
        ok, undo = True, None
    try:
        probe = path / ".probe"
        try:
            probe.touch()
            probe.unlink()
            pytest.skip("cannot make a directory read-only on this machine (root without chattr)")
        except OSError:
            pass
        if not ok:
            pytest.skip("cannot make a directory read-only here")
        yield
    finally:
        if undo:
            subprocess.run(undo, capture_output=True)
        else:
            path.chmod(0o755)


def _state(ws: Path) -> dict:
    """Every stage output's dataset fingerprints, re-computed from the bytes."""
    from tasks.core.store import Store, fingerprint_dataset

    return {str(o.path.relative_to(ws)): {n: fingerprint_dataset(o.path / n) for n in o.manifest["datasets"]}
            for o in Store(ws).outputs()}


def test_the_matrix_has_what_the_issue_lists():
    assert len(CASES) >= 20
    assert {"error", "rejected", "accepted"} == {c.outcome for c in CASES.values()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, base, tmp_path):
    case = CASES[name]
    d = tmp_path / "work"
    shutil.copytree(base, d, symlinks=True)
    before = _state(d / "ws")
    runs_before = len(list((d / "ws" / "runs").glob("*/run.json")))
    changes = case.setup(d)
    with contextlib.ExitStack() as stack:
        url = ""
        if case.server is not None:
            server = stack.enter_context(OpenAIServer())
            for k, v in case.server.items():
                setattr(server.behaviour, k, v)
            url = server.base_url
        if changes:
            (d / "config.yaml").write_text(yaml.safe_dump(_merge(_base_config(), _fill(changes, url))))
        if name == "read-only-workspace":
            stack.enter_context(_read_only(d / "ws"))
        args = case.command or ("run", "config.yaml", "--stages", case.stages)
        proc = _guidedrl(d, *args, env=case.env)
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out[-4000:]
    if case.outcome == "error":
        assert proc.returncode == 1, out[-3000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, proc.stderr[-3000:]
        for fragment in case.expect:
            assert fragment in errors[0], (fragment, errors[0])
        if case.before_flow:
            assert len(list((d / "ws" / "runs").glob("*/run.json"))) == runs_before, "the error came after the flow started"
    else:
        assert proc.returncode == 0, out[-3000:]
    if case.outcome == "rejected":
        from tasks.core.store import Store

        [new] = [o for o in Store(d / "ws").outputs("curate") if str(o.path.relative_to(d / "ws")) not in before]
        reasons = new.read("rejected").column("reason").to_pylist()
        assert any(r.startswith(case.expect[0]) for r in reasons), reasons
    if name == "judge-answers-429-retry-after":
        assert server.behaviour.attempts and max(server.behaviour.attempts.values()) == 2  # each prompt: a 429, then the answer
    after = _state(d / "ws")
    assert {k: after.get(k) for k in before} == before, "an earlier output was changed or removed"
    assert not list((d / "ws" / "store").glob("*/.tmp-*")), "a temporary was left in the store"
    assert not (d / "pulled").exists()
