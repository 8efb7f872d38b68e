"""Datasets shared over a real S3 endpoint: moto's S3 server (a subprocess on a free port) with s3fs as the
fsspec driver. Endpoint and credentials come from the environment only; another team reads what was published
straight from S3 with polars, pyarrow and `datasets`, without guidedrl."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from tasks.core.schemas import to_table  # noqa: E402
from tasks.core.store import Store  # noqa: E402
from tests.conftest import _cli, _free_port  # noqa: E402

pytestmark = pytest.mark.slow  # end to end: a moto S3 server and whole publish / pull round trips

SECRET = "guidedrl-S3-SECRET-5d7a1c9e3b"
KEY_ID = "AKIAGUIDEDRLTEST0001"


def _moto(port: int, **env) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **env})
    import socket

    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not start")


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server; the environment points the AWS clients at it (module scope, restored afterwards)."""
    port = _free_port()
    proc = _moto(port)
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET,
                       "AWS_DEFAULT_REGION": "us-east-1"})
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir("team-data")
    try:
        yield {"endpoint": f"http://127.0.0.1:{port}", "fs": fs}
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()


def _dataset(ws: Path, n: int = 6, name: str = "sft") -> Path:
    rows = [{"prompt": f"q{i}", "completion": f"a{i}", "problem_id": f"p{i}", "prompt_kind": "plain", "sample_id": f"s{i}"}
            for i in range(n)]
    out = Store(ws).write("materialize", f"k{n}", {name: (name, to_table(rows, name))}, config={}, inputs={}, stage_version="t",
                          cards={name: "# card\n"})
    return out.dataset_path(name)


def _one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode != 0
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert all(n in errors[0] for n in needles), errors[0]
    assert SECRET not in proc.stdout + proc.stderr
    return errors[0]


def test_publish_ls_pull_diff_export_round_trip(s3, tmp_path):
    src = _dataset(tmp_path / "ws")
    url = "s3://team-data/sft/v1"
    out = _cli("datasets", "publish", str(src), url)
    assert f"to {url}" in out.stdout.replace("\n", "")
    assert sorted(s3["fs"].find("team-data/sft/v1")) == ["team-data/sft/v1/README.md", "team-data/sft/v1/data/part-00000.parquet",
                                                          "team-data/sft/v1/manifest.json"]
    listed = _cli("datasets", "ls", "s3://team-data/", "--json")
    import json

    [entry] = json.loads(listed.stdout)
    assert entry["name"] == "sft/v1" and entry["kind"] == "sft" and entry["rows"] == 6 and entry["fingerprint"].startswith("sha256:")
    assert "sft/v1" in _cli("datasets", "ls", "s3://team-data/").stdout
    _cli("datasets", "pull", url, str(tmp_path / "got"))
    assert (tmp_path / "got" / "README.md").read_text() == "# card\n"
    same = _cli("datasets", "diff", str(src), url)
    assert "6" in same.stdout and "summaries differ" not in same.stdout
    other = _dataset(tmp_path / "ws2", n=4)
    diff = _cli("datasets", "diff", str(other), url).stdout
    assert "4" in diff and "6" in diff
    again = _cli("datasets", "publish", str(src), url, check=False)
    _one_error_line(again, url, "already holds a dataset")
    exported = _cli("datasets", "export", str(src), "--to", "hf", "s3://team-data/exports/sft")
    assert "exported" in exported.stdout
    names = sorted(p.rsplit("/", 1)[-1] for p in s3["fs"].find("team-data/exports/sft"))
    assert "README.md" in names and any(n.endswith(".parquet") for n in names)
    # no credential in anything written or printed
    written = [p for p in (tmp_path).rglob("*") if p.is_file()]
    assert not [p for p in written if SECRET.encode() in p.read_bytes() or KEY_ID.encode() in p.read_bytes()]
    for key in s3["fs"].find("team-data"):
        body = s3["fs"].cat_file(key)
        assert SECRET.encode() not in body and KEY_ID.encode() not in body, key


def test_another_team_reads_the_published_dataset_straight_from_s3(s3, tmp_path, monkeypatch):
    """polars, pyarrow and `datasets` read the published rows with their own S3 clients: the local rows back."""
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs
    import polars as pl

    src = _dataset(tmp_path / "ws", n=9)
    from tasks.core.share import publish

    publish(src, "s3://team-data/readers/sft")
    want = pl.read_parquet(str(src / "data")).sort("sample_id")
    ep = s3["endpoint"]
    got = pl.scan_parquet("s3://team-data/readers/sft/data/*.parquet", storage_options={
        "aws_endpoint_url": ep, "aws_access_key_id": KEY_ID, "aws_secret_access_key": SECRET, "aws_region": "us-east-1",
        "aws_allow_http": "true"}).collect().sort("sample_id")
    assert got.equals(want)
    fs = pafs.S3FileSystem(endpoint_override=ep, access_key=KEY_ID, secret_key=SECRET, scheme="http", region="us-east-1")
    table = pads.dataset("team-data/readers/sft/data", filesystem=fs, format="parquet").to_table()
    assert pl.from_arrow(table).sort("sample_id").equals(want)
    import datasets

    # the tests run with HF_HUB_OFFLINE=1 (no hub, ever), which `datasets` also applies to s3:// files; the other team
    # reading from its S3 is online, so that switch is off for this one read (nothing here names a hub repository)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    ds = datasets.load_dataset("parquet", data_files="s3://team-data/readers/sft/data/*.parquet", split="train",
                               cache_dir=str(tmp_path / "hf-cache"),
                               storage_options={"key": KEY_ID, "secret": SECRET, "client_kwargs": {"endpoint_url": ep}})
    assert sorted(ds["sample_id"]) == want["sample_id"].to_list() and ds.num_rows == 9


def test_a_publish_killed_halfway_is_invisible_and_the_next_one_completes(s3, tmp_path):
    """An object store has no rename: data objects first, the manifest last. Killed after the first data object
    (fault point share.publish.part), nothing is listed or pullable; publishing again completes it."""
    src = _dataset(tmp_path / "ws", n=5)
    url = "s3://team-data/killed/sft"
    exe = Path(sys.executable).with_name("guidedrl")
    proc = subprocess.run([str(exe), "datasets", "publish", str(src), url], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "GUIDEDRL_FAULT": "share.publish.part"}, start_new_session=True)
    assert proc.returncode == -signal.SIGKILL
    assert s3["fs"].exists("team-data/killed/sft/data/part-00000.parquet") and not s3["fs"].exists("team-data/killed/sft/manifest.json")
    import json

    assert [e["name"] for e in json.loads(_cli("datasets", "ls", "s3://team-data/killed/", "--json").stdout)] == []
    _one_error_line(_cli("datasets", "pull", url, str(tmp_path / "x"), check=False), url, "no manifest.json")
    assert not (tmp_path / "x").exists()
    _cli("datasets", "publish", str(src), url)
    _cli("datasets", "pull", url, str(tmp_path / "ok"))
    assert [e["name"] for e in json.loads(_cli("datasets", "ls", "s3://team-data/killed/", "--json").stdout)] == ["sft"]


def test_pull_refuses_bytes_changed_on_s3(s3, tmp_path):
    from tasks.core.share import ShareError, publish, pull

    publish(_dataset(tmp_path / "ws", n=3), "s3://team-data/tampered")
    other = _dataset(tmp_path / "ws2", n=2)
    s3["fs"].pipe("team-data/tampered/data/part-00000.parquet", (other / "data" / "part-00000.parquet").read_bytes())
    with pytest.raises(ShareError, match="do not match the manifest's fingerprint"):
        pull("s3://team-data/tampered", tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_missing_bucket_wrong_credentials_and_a_down_endpoint_are_one_line_each(s3, tmp_path):
    src = _dataset(tmp_path / "ws", n=2)
    url = "s3://no-such-bucket/sft"
    _one_error_line(_cli("datasets", "publish", str(src), url, check=False), url, "does not exist")
    assert not s3["fs"].exists("no-such-bucket")  # never created
    port = _free_port()
    strict = _moto(port, INITIAL_NO_AUTH_ACTION_COUNT="0")  # checks credentials: these are no user's
    try:
        env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        proc = subprocess.run([str(Path(sys.executable).with_name("guidedrl")), "datasets", "publish", str(src), "s3://team-data/x"],
                              capture_output=True, text=True, timeout=120, env=env)
        _one_error_line(proc, "s3://team-data/x", "access denied")
    finally:
        strict.terminate()
        strict.wait(timeout=20)
    down = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}"}
    t0 = time.time()
    proc = subprocess.run([str(Path(sys.executable).with_name("guidedrl")), "datasets", "ls", "s3://team-data/"],
                          capture_output=True, text=True, timeout=300, env=down)
    _one_error_line(proc, "s3://team-data/", "does not answer")
    assert time.time() - t0 < 120
