import json
import subprocess
import sys
import textwrap
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.core.schemas import SCHEMAS, SchemaError, to_table, validate_table
from tasks.core.store import Store, fingerprint_dataset, read_dataset, stage_key

ROWS = [
    {"problem_id": "a1", "question": "1 + 1 =", "answer": "2", "reference_solution": None, "source": "s",
     "level": "easy", "split": "train", "metadata": "{}"},
    {"problem_id": "b2", "question": "2 + 2 =", "answer": "4", "reference_solution": "2 + 2 = 4", "source": "s",
     "level": None, "split": "eval", "metadata": "{}"},
]


def _write(store, key="k1", rows=ROWS, **kw):
    return store.write(
        "curate", key, {"problems": ("problems", to_table(rows, "problems"))},
        config={"x": 1}, inputs={"sources.0": "sha256:abc"}, stage_version="1", summary={"problems": len(rows)}, **kw,
    )


def test_every_contract_schema_is_in_one_module():
    assert {"problems", "rejected", "rollouts", "explanations", "grades", "rubrics", "dpo", "grpo", "sft", "eval"} <= set(SCHEMAS)
    assert {"explain_loglik", "explain_answer_gain"} <= set(SCHEMAS["explanations"].names)
    assert set(SCHEMAS["rollouts"].names) <= set(SCHEMAS["explanations"].names)


def test_stage_key_depends_on_each_part():
    base = stage_key("curate", {"a": 1}, {"i": "x"}, "1")
    assert base == stage_key("curate", {"a": 1}, {"i": "x"}, "1")
    assert len({base, stage_key("rollouts", {"a": 1}, {"i": "x"}, "1"), stage_key("curate", {"a": 2}, {"i": "x"}, "1"),
                stage_key("curate", {"a": 1}, {"i": "y"}, "1"), stage_key("curate", {"a": 1}, {"i": "x"}, "2")}) == 5


def test_write_then_read_back_with_manifest(tmp_path):
    store = Store(tmp_path)
    out = _write(store)
    assert out.path == tmp_path / "store" / "curate" / "k1"
    m = json.loads((out.path / "problems" / "manifest.json").read_text())
    for field in ("schema_version", "num_rows", "fingerprint", "config", "inputs", "package_version", "created", "summary", "kind"):
        assert field in m, field
    assert m["num_rows"] == 2 and m["inputs"] == {"sources.0": "sha256:abc"} and m["config"] == {"x": 1}
    assert m["fingerprint"] == fingerprint_dataset(out.path / "problems")
    table = read_dataset(out.path / "problems", verify=True)
    assert table.column("question").to_pylist() == ["1 + 1 =", "2 + 2 ="]
    assert store.outputs()[0].key == "k1"


def test_existing_output_is_returned_without_writing(tmp_path):
    store = Store(tmp_path)
    first = _write(store)
    mtime = (first.path / "manifest.json").stat().st_mtime_ns
    again = _write(store, rows=ROWS[:1])  # same key: the stored output wins
    assert again.path == first.path
    assert (first.path / "manifest.json").stat().st_mtime_ns == mtime
    assert read_dataset(again.dataset_path("problems")).num_rows == 2


def test_replace_swaps_only_after_the_new_output_is_complete(tmp_path):
    store = Store(tmp_path)
    _write(store)
    out = _write(store, rows=ROWS[:1], replace=True)
    assert read_dataset(out.dataset_path("problems")).num_rows == 1
    assert [p.name for p in (tmp_path / "store" / "curate").iterdir()] == ["k1"]


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {root!r})
    import tasks.core.store as store_mod
    from tasks.core.schemas import to_table
    import pyarrow.parquet as pq
    where = sys.argv[2]
    if where == "rename":
        store_mod._publish = lambda tmp, final: os.kill(os.getpid(), signal.SIGKILL)
    else:  # die half-way through writing a Parquet file
        real = pq.write_table
        def half(table, path, **kw):
            real(table.slice(0, 1), path, **kw)
            with open(path, "r+b") as fh:
                fh.truncate(20)
            os.kill(os.getpid(), signal.SIGKILL)
        store_mod.pq.write_table = half
    rows = [dict(problem_id=str(i), question="q%d" % i, answer="1", reference_solution=None, source="s",
                 level=None, split="train", metadata="{{}}") for i in range(100)]
    store_mod.Store(sys.argv[1]).write("curate", "k1", {{"problems": ("problems", to_table(rows, "problems"))}},
                                       config={{}}, inputs={{}}, stage_version="1")
    """
)


@pytest.mark.parametrize("where", ["rename", "parquet"])
def test_killed_write_never_looks_finished(tmp_path, where):
    from tests.conftest import ROOT

    script = tmp_path / "writer.py"
    script.write_text(KILL_SCRIPT.format(root=str(ROOT)))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ws"), where], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    store = Store(tmp_path / "ws")
    leftovers = list((tmp_path / "ws" / "store" / "curate").iterdir())
    assert leftovers and all(p.name.startswith(".tmp-") for p in leftovers)  # the debris is there ...
    assert store.get("curate", "k1") is None  # ... but nothing looks finished
    assert store.outputs() == []
    out = _write(store)  # the next writer cleans up and succeeds
    assert [p.name for p in (tmp_path / "ws" / "store" / "curate").iterdir()] == ["k1"]
    assert read_dataset(out.dataset_path("problems"), verify=True).num_rows == 2


def test_concurrent_writers_of_one_key_leave_one_output(tmp_path):
    store = Store(tmp_path)
    results, errors = [], []

    def go(n):
        try:
            results.append(_write(Store(tmp_path), rows=ROWS[:n]))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(1 + i % 2,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [p.name for p in (tmp_path / "store" / "curate").iterdir()] == ["k1"]
    fps = {r.fingerprints["problems"] for r in results}
    assert fps == {store.get("curate", "k1").fingerprints["problems"]}


def test_reader_names_file_and_missing_column(tmp_path):
    out = _write(Store(tmp_path))
    part = out.path / "problems" / "data" / "part-00000.parquet"
    pq.write_table(pq.read_table(part).drop_columns(["answer"]), part)
    with pytest.raises(SchemaError, match=r"part-00000\.parquet.*'answer' is missing"):
        read_dataset(out.path / "problems")


def test_reader_names_mistyped_column_and_nulls(tmp_path):
    out = _write(Store(tmp_path))
    part = out.path / "problems" / "data" / "part-00000.parquet"
    t = pq.read_table(part)
    t = t.set_column(t.schema.get_field_index("split"), "split", pa.array([1, 2], pa.int64()))
    pq.write_table(t, part)
    with pytest.raises(SchemaError, match=r"part-00000\.parquet.*'split' has type int64, expected string"):
        read_dataset(out.path / "problems")
    bad = pa.table({**{n: pa.array(["x", "y"]) for n in SCHEMAS["problems"].names}, "question": pa.array(["x", None])})
    with pytest.raises(SchemaError, match=r"'question' has 1 null value\(s\) \(first at row 1\)"):
        validate_table(bad, "problems", "somewhere.parquet")


def test_verify_detects_changed_bytes(tmp_path):
    out = _write(Store(tmp_path))
    part = out.path / "problems" / "data" / "part-00000.parquet"
    t = pq.read_table(part)
    pq.write_table(t.slice(0, 1), part)
    read_dataset(out.path / "problems")  # still a valid table ...
    with pytest.raises(SchemaError, match="do not match the manifest fingerprint"):
        read_dataset(out.path / "problems", verify=True)  # ... but not the one the manifest describes


def test_unreadable_parquet_names_the_file(tmp_path):
    out = _write(Store(tmp_path))
    part = out.path / "problems" / "data" / "part-00000.parquet"
    part.write_bytes(b"not parquet at all")
    with pytest.raises(SchemaError, match=r"part-00000\.parquet: cannot be read as Parquet"):
        read_dataset(out.path / "problems")


def test_a_lock_held_by_a_killed_process_never_blocks_the_next_run(tmp_path):
    """The output lock is a flock: when its holder is killed (-9) the kernel releases it, whatever is left on disk."""
    from tests.conftest import ROOT

    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from tasks.core.store import Store
with Store({str(tmp_path)!r}).lock("grade", "k1"):
    print("held", flush=True)
    time.sleep(600)
"""], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    lock_file = tmp_path / "store" / "grade" / ".lock-k1"
    assert lock_file.exists()
    holder.kill()
    holder.wait()
    assert lock_file.exists()  # the file stays; the lock does not
    assert not Store(tmp_path).in_use("grade", "k1")  # nobody holds it: taking it does not wait
    with Store(tmp_path).lock("grade", "k1"):
        assert Store(tmp_path).in_use("grade", "k1")


def test_a_stage_whose_input_is_empty_says_so(tmp_path):
    """No silent emptiness: an upstream dataset with no rows is named in the output's summary and its result line
    (rejection lists do not count)."""
    from tasks.core.stage import Job
    from tasks.core.store import StageOutput
    from tasks.registry import REGISTRY

    def output(stage, datasets):
        return StageOutput(stage, "k", tmp_path / stage, {"datasets": {n: {"kind": k, "num_rows": r} for n, (k, r) in datasets.items()}})

    upstream = {"curate": output("curate", {"problems": ("problems", 12), "rejected": ("rejected", 0)}),
                "filter": output("filter", {"problems": ("filtered_problems", 0), "pass_rates": ("pass_rates", 12)})}
    job = Job(REGISTRY["explain"], None, Store(tmp_path), upstream, "k", {}, {})
    assert job.empty_inputs() == ["filter/problems"]
    line = REGISTRY["explain"].describe({"empty_inputs": job.empty_inputs()})
    assert line.endswith("— empty input: filter/problems")
    assert "empty input" not in REGISTRY["explain"].describe({})


def test_parts_given_as_files_are_linked_in_and_head_rows_reads_across_them(tmp_path):
    """A stage that wrote its parts as it went hands the store their paths: linked in (same inode), schema
    checked, row count from the metadata; a part with a wrong schema is refused, naming the file.
    `head_rows` (what `datasets show` prints) takes the first rows across part files, in order."""
    from tasks.core.store import head_rows, write_parquet

    rows = [dict(ROWS[i % 2], problem_id=f"p{i}") for i in range(7)]
    files = []
    for i, chunk in enumerate((rows[:3], rows[3:7])):
        files.append(tmp_path / f"part{i}.parquet")
        write_parquet(to_table(chunk, "problems"), files[-1])
    store = Store(tmp_path / "ws")
    out = store.write("curate", "k", {"problems": ("problems", files)}, config={}, inputs={}, stage_version="1")
    data = sorted((out.dataset_path("problems") / "data").glob("*.parquet"))
    assert len(data) == 2 and data[0].stat().st_ino == files[0].stat().st_ino
    assert out.manifest["datasets"]["problems"]["num_rows"] == 7 and read_dataset(out.dataset_path("problems")).num_rows == 7
    assert head_rows(out.dataset_path("problems"), 5).column("problem_id").to_pylist() == ["p0", "p1", "p2", "p3", "p4"]
    assert head_rows(out.dataset_path("problems"), 50).num_rows == 7
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"problem_id": ["x"]}), bad)
    with pytest.raises(SchemaError, match="bad.parquet"):
        store.write("curate", "k2", {"problems": ("problems", [bad])}, config={}, inputs={}, stage_version="1")


def test_gc_unlinking_a_lock_file_between_its_open_and_its_lock_never_gives_two_holders(tmp_path, monkeypatch):
    """`gc` unlinks lock files nobody holds. A process that opened the file just before and locks it just after
    would hold a lock on a removed file while the next one creates and locks a new file: two writers of one key.
    ``Store.lock`` sees the file gone from its path and takes the lock again on the file that is there."""
    import fcntl

    from tasks.core.locks import unlink_unheld

    store = Store(tmp_path)
    real_flock, raced = fcntl.flock, []

    def flock(fh, op):
        if not raced and op & fcntl.LOCK_EX:  # between our open and our lock, gc runs
            raced.append(None)
            monkeypatch.setattr(fcntl, "flock", real_flock)
            raced[0] = unlink_unheld(tmp_path / "store" / "grade" / ".lock-k1", dry_run=False)
        return real_flock(fh, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    with store.lock("grade", "k1"):
        assert raced == [True]  # gc did unlink the file this process had opened
        assert store.in_use("grade", "k1")  # ... and the lock held is on the file at the path: a second writer waits
    assert not store.in_use("grade", "k1")


def test_a_file_system_without_locks_is_refused_before_the_run_starts(tmp_path, monkeypatch):
    """A workspace whose file system refuses advisory locks (some FUSE and old NFS mounts): every run's preflight says
    what a shared workspace needs, in one error, before any work; nothing is left in the store."""
    import errno
    import fcntl

    from tasks.core.config import ConfigError
    from tasks.registry import parse_config, preflight

    def refuse(fh, op):
        raise OSError(errno.ENOLCK, "No locks available")

    config = parse_config({"problems": {"sources": [{"file": "x.jsonl"}]}}, base_dir=tmp_path)
    monkeypatch.setattr(fcntl, "flock", refuse)
    with pytest.raises(ConfigError, match=r"store: the store's file system refuses locks \(No locks available\); a shared "
                                          r"workspace needs POSIX advisory locks across hosts"):
        preflight(config, [], tmp_path / "ws")
    assert list((tmp_path / "ws" / "store").iterdir()) == []
