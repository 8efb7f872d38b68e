"""Publishing and pulling datasets through fsspec; what a receiving team sees."""

import json
import subprocess
import sys

import fsspec
import pyarrow.parquet as pq
import pytest

from tasks.core.schemas import to_table
from tasks.core.share import ShareError, describe, publish, pull
from tasks.core.store import Store


def _dataset(tmp_path, rows=None, name="sft"):
    rows = rows or [{"prompt": f"q{i}", "completion": f"a{i}", "problem_id": f"p{i}", "prompt_kind": "plain",
                     "sample_id": f"s{i}"} for i in range(5)]
    out = Store(tmp_path / "ws").write("materialize", f"k{len(rows)}", {name: (name, to_table(rows, name))},
                                       config={}, inputs={}, stage_version="t", cards={name: "# card\n"})
    return out.dataset_path(name)


@pytest.fixture()
def memfs():
    fs = fsspec.filesystem("memory")
    yield fs
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")


def test_publish_then_pull_round_trip_through_memory(tmp_path, memfs):
    src = _dataset(tmp_path)
    publish(src, "memory://team/sft-v1")
    assert sorted(memfs.find("/team/sft-v1")) == ["/team/sft-v1/README.md", "/team/sft-v1/data/part-00000.parquet",
                                                   "/team/sft-v1/manifest.json"]
    with pytest.raises(ShareError, match="already holds a dataset"):
        publish(src, "memory://team/sft-v1")
    m = pull("memory://team/sft-v1", tmp_path / "got")
    assert m["num_rows"] == 5 and (tmp_path / "got" / "README.md").read_text() == "# card\n"
    assert pq.read_table(tmp_path / "got" / "data").num_rows == 5
    with pytest.raises(ShareError, match="already exists"):
        pull("memory://team/sft-v1", tmp_path / "got")


def test_pull_refuses_changed_bytes_and_leaves_nothing_behind(tmp_path, memfs):
    publish(_dataset(tmp_path), "memory://team/d")
    other = _dataset(tmp_path, [{"prompt": "x", "completion": "y", "problem_id": "p", "prompt_kind": "plain", "sample_id": "s"}])
    memfs.pipe("/team/d/data/part-00000.parquet", (other / "data" / "part-00000.parquet").read_bytes())  # valid Parquet, other bytes
    with pytest.raises(ShareError, match="do not match the manifest's fingerprint"):
        pull("memory://team/d", tmp_path / "target")
    assert not (tmp_path / "target").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def test_pull_fetches_only_listed_parquet_files_inside_the_target(tmp_path, memfs):
    publish(_dataset(tmp_path), "memory://team/e")
    memfs.pipe("/team/e/load.py", b"import os; os.system('echo pwned')")  # a loading script is never fetched
    pull("memory://team/e", tmp_path / "ok")
    assert sorted(p.name for p in (tmp_path / "ok").rglob("*") if p.is_file()) == ["README.md", "manifest.json", "part-00000.parquet"]
    manifest = json.loads(memfs.cat_file("/team/e/manifest.json"))
    for evil in (["../../escape.parquet"], ["/etc/passwd"], ["data/x.pkl"], ["data/../../x.parquet"]):
        memfs.pipe("/team/e/manifest.json", json.dumps({**manifest, "files": evil}).encode())
        with pytest.raises(ShareError, match="only Parquet files directly under data/"):
            pull("memory://team/e", tmp_path / "evil")
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "escape.parquet").exists()


def test_a_published_directory_loads_without_guidedrl(tmp_path):
    src = _dataset(tmp_path)
    dest = tmp_path / "shared" / "sft"
    publish(src, f"file://{dest}")
    code = (
        "import sys, polars as pl, pyarrow.dataset as ds\n"
        "from datasets import load_dataset\n"
        "d = sys.argv[1]\n"
        "assert 'tasks' not in sys.modules and 'guidedrl' not in sys.modules\n"
        "a = pl.read_parquet(d + '/data/*.parquet').height\n"
        "b = ds.dataset(d + '/data', format='parquet').to_table().num_rows\n"
        "c = len(load_dataset('parquet', data_files=d + '/data/*.parquet')['train'])\n"
        "print(a, b, c)\n"
    )
    out = subprocess.run([sys.executable, "-I", "-c", code, str(dest)], capture_output=True, text=True, cwd=tmp_path,
                         env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["5", "5", "5"]


def test_describe_gives_what_diff_compares(tmp_path):
    a = describe(_dataset(tmp_path))
    b = describe(_dataset(tmp_path, [{"prompt": "x", "completion": "y", "problem_id": "p", "prompt_kind": "hint", "sample_id": "s"}]))
    assert (a["rows"], b["rows"]) == (5, 1) and a["schema"] == b["schema"]
    assert a["stats"]["prompt"]["distinct"] == 5 and a["fingerprint"] != b["fingerprint"]


def test_cli_publish_pull_diff(tmp_path, cli):
    src = _dataset(tmp_path)
    other = _dataset(tmp_path, [{"prompt": "x", "completion": "y", "problem_id": "p", "prompt_kind": "hint", "sample_id": "s"}])
    url = f"file://{tmp_path / 'shared' / 'sft'}"
    r = cli("datasets", "publish", str(src), url)
    assert "published" in r.stdout and "load_dataset" in r.stdout
    cli("datasets", "pull", url, str(tmp_path / "got"))
    (tmp_path / "shared" / "sft" / "data" / "part-00000.parquet").write_bytes((other / "data" / "part-00000.parquet").read_bytes())
    bad = cli("datasets", "pull", url, str(tmp_path / "got2"), check=False)
    assert bad.returncode == 1 and "fingerprint" in bad.stderr and not (tmp_path / "got2").exists()
    d = cli("datasets", "diff", str(tmp_path / "got"), str(other)).stdout
    assert "rows" in d and "5" in d and "prompt_kind: distinct" in d
