"""The dataset store: content-addressed stage outputs in ``<workspace>/store``.

Layout::

    <workspace>/store/<stage>/<key>/manifest.json        the stage output
    <workspace>/store/<stage>/<key>/<dataset>/manifest.json
    <workspace>/store/<stage>/<key>/<dataset>/data/part-00000.parquet

``key`` is a hash of (stage name, stage config, input fingerprints, the stage's
``STAGE_VERSION``), so asking for a stage output that exists returns it without
work. A dataset's fingerprint is the sha256 of its data files' bytes. Every
dataset directory carries its own manifest and is self-describing: copy it
anywhere and polars, pyarrow or ``datasets`` read it without guidedrl; the
Parquet files sit in ``data/`` so that ``pq.read_table(<dataset>/data)`` and
other directory readers see only Parquet.

Writes are atomic: everything is written under a temporary name in the same
directory and renamed into place last, so a killed process never leaves a
directory that looks finished (a finished output is exactly a ``<key>``
directory; temporaries start with ``.tmp-``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core import locks
from tasks.core.faults import fault
from tasks.core.owner import HEARTBEAT, new_name, removable
from tasks.core.schemas import SCHEMA_VERSION, SchemaError, validate_table

log = logging.getLogger("guidedrl.store")

MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 20


def package_version() -> str:
    try:
        return metadata.version("guidedrl")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the form that is hashed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@lru_cache(maxsize=4096)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file's bytes; memoised on (path, size, mtime) so that a big
    source file is hashed once per process, not once per cache-key lookup."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fingerprint_files(paths: Iterable[Path], root: Path | None = None) -> str:
    """sha256 over the files' names (relative to ``root``) and bytes, in name order."""
    h = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        name = str(path.relative_to(root)) if root else path.name
        st = path.stat()
        h.update(name.encode() + b"\0" + _file_digest(str(path.resolve()), st.st_size, st.st_mtime_ns).encode() + b"\0")
    return "sha256:" + h.hexdigest()


DATA_DIR = "data"


def data_files(dataset_dir: Path) -> list[Path]:
    return sorted((Path(dataset_dir) / DATA_DIR).glob("*.parquet"))


def fingerprint_dataset(dataset_dir: Path) -> str:
    """The content fingerprint of a dataset directory: its Parquet files' bytes."""
    files = data_files(dataset_dir)
    if not files:
        raise FileNotFoundError(f"{dataset_dir}: no Parquet files in this dataset directory")
    return fingerprint_files(files)


def stage_key(stage: str, config: Mapping[str, Any], inputs: Mapping[str, str], stage_version: str) -> str:
    """The store key of a stage output: what it is made of, hashed."""
    payload = canonical_json(
        {"stage": stage, "config": config, "inputs": dict(inputs), "stage_version": stage_version}
    )
    return sha256_bytes(payload.encode())[:20]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def write_parquet(table: pa.Table, path: Path) -> None:
    """Write one Parquet file and flush it to disk (callers rename it into place)."""
    pq.write_table(table, path)
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def link_or_copy(src: Path, dest: Path) -> None:
    """``dest`` as a hard link to ``src`` (same file system: no bytes copied), else a copy flushed to disk."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)
        with open(dest, "rb+") as fh:
            os.fsync(fh.fileno())


def write_dataset_files(
    dataset_dir: Path,
    kind: str,
    tables: pa.Table | Path | Iterable[pa.Table | Path],
    manifest_fields: Mapping[str, Any],
) -> dict:
    """Write one dataset (Parquet part files + manifest.json) into an existing,
    not-yet-published directory and return its manifest. Callers make the
    directory visible by renaming it (see ``Store.write``).

    A part is a table, or the path of a Parquet file already written (by a stage that
    writes its output in parts as it goes): that file is linked in (or copied), its
    schema checked from its metadata, so no part need be in memory."""
    tables = [tables] if isinstance(tables, (pa.Table, Path)) else tables
    (dataset_dir / DATA_DIR).mkdir(parents=True, exist_ok=True)
    num_rows = 0
    schema = None
    for i, table in enumerate(tables):
        path = dataset_dir / DATA_DIR / f"part-{i:05d}.parquet"
        if isinstance(table, Path):
            part_schema = pq.read_schema(table)
            validate_table(part_schema.empty_table(), kind, table)
            link_or_copy(table, path)
            rows = pq.ParquetFile(table).metadata.num_rows
        else:
            validate_table(table, kind, path)
            write_parquet(table, path)
            rows, part_schema = table.num_rows, table.schema
        num_rows += rows
        schema = schema or part_schema
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "num_rows": num_rows,
        "fingerprint": fingerprint_dataset(dataset_dir),
        "files": [str(p.relative_to(dataset_dir)) for p in data_files(dataset_dir)],
        "columns": [{"name": f.name, "type": str(f.type)} for f in schema] if schema else [],
        "package_version": package_version(),
        "created": _now(),
        **manifest_fields,
    }
    _write_json(dataset_dir / MANIFEST, manifest)
    return manifest


def read_manifest(path: Path) -> dict:
    path = Path(path)
    mpath = path / MANIFEST if path.is_dir() else path
    try:
        with open(mpath) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"{mpath}: no manifest.json; not a guidedrl dataset or stage output") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{mpath}: manifest.json is not valid JSON ({exc})") from None


def read_dataset(dataset_dir: Path, kind: str | None = None, verify: bool = False) -> pa.Table:
    """Read a dataset directory into one Arrow table, validating every file
    against the contract schema of its kind (from the manifest unless given).

    With ``verify`` the data files' fingerprint must match the manifest's.
    """
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    kind = kind or manifest.get("kind")
    if verify:
        actual = fingerprint_dataset(dataset_dir)
        if actual != manifest.get("fingerprint"):
            raise SchemaError(
                f"{dataset_dir}: data files do not match the manifest fingerprint "
                f"({actual} != {manifest.get('fingerprint')}); the dataset was changed or damaged"
            )
    names = manifest.get("files") or [str(p.relative_to(dataset_dir)) for p in data_files(dataset_dir)]
    tables = []
    for name in names:
        path = dataset_dir / name
        try:
            table = pq.read_table(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: listed in the manifest but missing") from None
        except (pa.ArrowInvalid, OSError) as exc:
            raise SchemaError(f"{path}: cannot be read as Parquet ({exc})") from exc
        validate_table(table, kind, path)
        tables.append(table)
    if not tables:
        raise SchemaError(f"{dataset_dir}: dataset has no data files")
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


def open_dataset(dataset_dir: Path):
    """A dataset directory as a lazy pyarrow dataset, its bytes verified against the manifest's
    fingerprint (hashed in chunks) and its schema against the contract: (dataset, row count from
    the Parquet metadata). Nothing is read whole: for ``datasets show`` on millions of rows."""
    import pyarrow.dataset as pads

    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    files = data_files(dataset_dir)
    if not files:
        raise SchemaError(f"{dataset_dir}: dataset has no data files")
    actual = fingerprint_dataset(dataset_dir)
    if actual != manifest.get("fingerprint"):
        raise SchemaError(f"{dataset_dir}: data files do not match the manifest fingerprint "
                          f"({actual} != {manifest.get('fingerprint')}); the dataset was changed or damaged")
    try:
        data = pads.dataset([str(f) for f in files], format="parquet")
    except (pa.ArrowInvalid, OSError) as exc:
        raise SchemaError(f"{dataset_dir}: cannot be read as Parquet ({exc})") from exc
    validate_table(data.schema.empty_table(), manifest.get("kind"), dataset_dir)
    return data, sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def iter_batches(files: Iterable[Path], batch_size: int, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """The files' rows a record batch at a time, file after file, with no read-ahead (a dataset
    scanner's default read-ahead holds ~16 batches: a GB at 1,024 tokens a row)."""
    for f in files:
        with pq.ParquetFile(f) as pf:
            yield from pf.iter_batches(batch_size=batch_size, columns=columns)


def head_rows(dataset_dir: Path, n: int) -> pa.Table:
    """The first ``n`` rows of a dataset, read a batch at a time from its files in order (nothing
    else is read). Not ``pyarrow.dataset.Dataset.head(batch_readahead=0, fragment_readahead=0)``:
    beside polars that crashed the process at exit (SIGSEGV, about one run in ten, pyarrow 26)."""
    files = data_files(Path(dataset_dir))
    batches, left = [], n
    for batch in iter_batches(files, max(1, min(n, 1024))) if n > 0 else ():
        batches.append(batch.slice(0, left))
        left -= batches[-1].num_rows
        if left <= 0:
            break
    return pa.Table.from_batches(batches, schema=pq.read_schema(files[0]))


@dataclass(frozen=True)
class StageOutput:
    """A finished stage output in the store."""

    stage: str
    key: str
    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: Path | str) -> "StageOutput":
        """The finished stage output in directory ``<store>/<stage>/<key>``."""
        path = Path(path)
        return cls(path.parent.name, path.name, path, read_manifest(path))

    def dataset_path(self, name: str) -> Path:
        if name not in self.manifest.get("datasets", {}):
            raise KeyError(f"{self.path}: stage {self.stage!r} has no dataset {name!r}; it has {sorted(self.manifest.get('datasets', {}))}")
        return self.path / name

    def read(self, name: str) -> pa.Table:
        return read_dataset(self.dataset_path(name))

    def scan(self, name: str):
        """Dataset ``name`` as a polars LazyFrame over its Parquet files, in file order: for
        stages that aggregate, filter or join without holding the dataset."""
        import polars as pl

        return pl.scan_parquet([str(f) for f in data_files(self.dataset_path(name))])

    def verify(self) -> None:
        """Check every dataset's data files against the fingerprint in the manifest (before a stage reads them; digests
        are cached per file by size and mtime, so a second check in the process costs a stat). Raises ``SchemaError``
        naming the output and how to recompute it."""
        for name, entry in self.manifest.get("datasets", {}).items():
            path = self.path / name
            try:
                actual = fingerprint_dataset(path)
            except FileNotFoundError as exc:
                actual = f"unreadable ({exc})"
            if actual != entry.get("fingerprint"):
                raise SchemaError(
                    f"{self.stage} output {self.path}: dataset {name!r} does not match the fingerprint in its manifest "
                    f"({actual} != {entry.get('fingerprint')}): it was changed or damaged after it was written; nothing read it. "
                    f"Recompute it: guidedrl rerun RUN_ID --stage {self.stage} --downstream (RUN_ID: this run, guidedrl runs ls), "
                    f"or remove {self.path} and run again")

    @property
    def fingerprints(self) -> dict[str, str]:
        return {n: d["fingerprint"] for n, d in self.manifest.get("datasets", {}).items()}

    @property
    def summary(self) -> dict:
        return self.manifest.get("summary", {})


class Store:
    """The stage-output store of one workspace."""

    def __init__(self, workspace: Path | str):
        self.workspace = Path(workspace)
        self.root = self.workspace / "store"

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def get(self, stage: str, key: str) -> StageOutput | None:
        """The finished output at (stage, key), or None if there is none."""
        path = self.path(stage, key)
        if not (path / MANIFEST).is_file():
            return None
        return StageOutput.open(path)

    def lock_path(self, stage: str, key: str) -> Path:
        return self.root / stage / f".lock-{key}"

    def lock(self, stage: str, key: str):
        """Held while one process works towards (stage, key) (``Stage.run``): a second run of the same output — on this
        host or another one sharing the store — waits, then finds it finished and reuses it (tasks/core/locks.py)."""
        return locks.hold(self.lock_path(stage, key), f"{stage}: another run is computing this output; waiting for it "
                                                       f"({self.lock_path(stage, key)})")

    def in_use(self, stage: str, key: str) -> bool:
        """Whether a process (on any host sharing the store) works towards (stage, key) now."""
        return locks.held(self.lock_path(stage, key))

    def reusable(self, stage: str, key: str, force: bool = False) -> StageOutput | None:
        """The finished output at (stage, key) unless a rerun is forced; says so in the log."""
        existing = self.get(stage, key)
        if existing is None or force:
            return None
        logging.getLogger(f"guidedrl.{stage}").info("%s: output already in the store, nothing to do: %s", stage, existing.path)
        return existing

    def outputs(self, stage: str | None = None) -> list[StageOutput]:
        """Every finished output (temporaries are never listed)."""
        found = []
        stages = [self.root / stage] if stage else sorted(p for p in self.root.glob("*") if p.is_dir())
        for sdir in stages:
            for kdir in sorted(sdir.glob("*")):
                if kdir.name.startswith(TMP_PREFIX) or not (kdir / MANIFEST).is_file():
                    continue
                found.append(StageOutput.open(kdir))
        return found

    @contextlib.contextmanager
    def scratch(self, stage: str) -> Iterator[Path]:
        """A scratch directory beside the stage's outputs (same file system, so
        ``write(directories=...)`` moves rather than copies); removed afterwards,
        and by ``clean_temporaries`` if its process died."""
        path = self.root / stage / new_name(f"{TMP_PREFIX}scratch")
        path.mkdir(parents=True)
        try:
            with HEARTBEAT.hold(path):
                yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def clean_temporaries(self, stage: str) -> list[Path]:
        """Remove temporaries left by writers that are no longer running: this host's whose process is gone,
        another host's whose lease expired (tasks/core/owner.py)."""
        removed = []
        for tmp in (self.root / stage).glob(TMP_PREFIX + "*"):
            if not removable(tmp):
                continue
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
        if removed:
            log.info("removed %d unfinished temporary output(s) of stage %s", len(removed), stage)
        return removed

    def write(
        self,
        stage: str,
        key: str,
        datasets: Mapping[str, tuple[str, pa.Table | list[pa.Table]]],
        *,
        config: Mapping[str, Any],
        inputs: Mapping[str, str],
        stage_version: str,
        summary: Mapping[str, Any] | None = None,
        dataset_summaries: Mapping[str, Mapping[str, Any]] | None = None,
        replace: bool = False,
        cards: Mapping[str, str] | None = None,
        directories: Mapping[str, Path] | None = None,
    ) -> StageOutput:
        """Write a stage output atomically: ``datasets`` maps a dataset name to
        (kind, table or list of part tables); ``cards`` a dataset name to its
        dataset card (README.md in the dataset directory); ``directories`` a name
        to a finished directory (a checkpoint) moved into the output, its file
        fingerprint recorded. If another writer finished the same key first, its
        output is kept and returned. With ``replace`` an existing output is
        swapped out only once the new one is complete."""
        final = self.path(stage, key)
        existing = self.get(stage, key)
        if existing and not replace:
            return existing
        final.parent.mkdir(parents=True, exist_ok=True)
        self.clean_temporaries(stage)
        tmp = final.parent / new_name(f"{TMP_PREFIX}{key}")
        tmp.mkdir()
        common = {"stage": stage, "stage_key": key, "stage_version": stage_version, "config": config, "inputs": dict(inputs)}
        try:
            with HEARTBEAT.hold(tmp):
                entries = {}
                for name, (kind, tables) in datasets.items():
                    m = write_dataset_files(tmp / name, kind, tables,
                                            {**common, "name": name, "summary": dict((dataset_summaries or {}).get(name, {}))})
                    entries[name] = {"kind": kind, "fingerprint": m["fingerprint"], "num_rows": m["num_rows"]}
                    if cards and name in cards:
                        (tmp / name / "README.md").write_text(cards[name])
                    fault("store.write.part", stage)
                dirs = {}
                for name, src in (directories or {}).items():
                    shutil.move(str(src), tmp / name)
                    dirs[name] = {"fingerprint": fingerprint_files([f for f in (tmp / name).rglob("*") if f.is_file()], root=tmp / name)}
                _write_json(tmp / MANIFEST, {**common, "schema_version": SCHEMA_VERSION, "datasets": entries,
                                             **({"directories": dirs} if dirs else {}), "summary": dict(summary or {}),
                                             "package_version": package_version(), "created": _now()})
                _fsync_dir(tmp)
                fault("store.publish.before-rename", stage)
                if replace and final.exists():
                    swap_in(tmp, final)
                else:
                    _publish(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if tmp.exists():  # lost a race: another writer published the same key
            shutil.rmtree(tmp, ignore_errors=True)
        _fsync_dir(final.parent)
        fault("store.publish.after-rename", stage)
        out = self.get(stage, key)
        assert out is not None
        return out


def swap_in(tmp: Path, final: Path) -> None:
    """Put the finished directory ``tmp`` at ``final``, replacing what is there
    only once the new one is complete (the old one is removed last)."""
    old = None
    if final.exists():
        old = final.parent / new_name(f"{TMP_PREFIX}old-{final.name}")
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _publish(tmp: Path, final: Path) -> None:
    """Rename a finished temporary into place; the one atomic step of a write."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / MANIFEST).is_file():
            raise

