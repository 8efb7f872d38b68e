"""Handing datasets to other teams: publish, pull, list and diff through fsspec.

A dataset directory (``manifest.json``, ``README.md``, ``data/part-*.parquet``)
is copied file by file to any fsspec URL — a local or shared directory,
``file://``, ``memory://``, and object stores once their fsspec driver is
installed (``pip install -e '.[s3]'``: s3fs; ``gcsfs``, ``adlfs``). Object-store
endpoints and credentials come from the environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` or a profile), never from a
config file; no message, manifest or run record carries them.

An object store has no rename: a publish puts the data objects first and the
manifest last, and a dataset exists for readers (``pull``, ``datasets ls URL``)
only once its manifest does — a publish killed halfway leaves objects no reader
lists, and the next publish to that URL completes it. Buckets are never created
here: a missing bucket, refused credentials or an endpoint that does not answer
is one error naming the URL, before anything is written.

Pulling trusts nothing it reads: only ``manifest.json`` (parsed as JSON), the
Parquet files the manifest lists (relative paths under ``data/``, nothing
else) and ``README.md`` are fetched; no pickles, no loading scripts, no
``trust_remote_code``; the files land in a temporary directory beside the
target and are renamed into place only after their fingerprint matches the
manifest's and every file passes the schema of its kind. A dataset whose bytes
changed is refused, and nothing is ever written outside the target.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Iterator

from tasks.core.faults import fault
from tasks.core.schemas import SCHEMAS, SchemaError
from tasks.core.owner import new_name
from tasks.core.store import DATA_DIR, MANIFEST, TMP_PREFIX, _now, data_files, fingerprint_dataset, read_dataset, read_manifest

CARD = "README.md"
MAX_MANIFEST_BYTES = 10 * 1024 * 1024


class ShareError(ValueError):
    """A publish or pull that cannot be done safely."""


def _fs(url: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise ShareError(f"{url}: no fsspec file system for this URL ({exc}); object stores need their driver, "
                         "e.g. pip install -e '.[s3]' (s3fs)") from None


def _join(root: str, rel: str) -> str:
    return root.rstrip("/") + "/" + rel


def _local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return bool({"file", "local"} & set(protocols))


@contextlib.contextmanager
def _remote(url: str, doing: str) -> Iterator[None]:
    """Errors of the file system behind ``url`` as one line naming it (never the credentials: the driver's
    messages carry the URL and the error code only)."""
    try:
        yield
    except ShareError:
        raise
    except PermissionError as exc:
        raise ShareError(f"{url}: access denied while {doing} ({_first_line(exc)}); check the credentials in the environment "
                         "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the bucket's policy") from None
    except Exception as exc:  # the drivers raise their own types (botocore, aiohttp): each is this URL's failure
        name = type(exc).__name__
        if "Connect" in name or "Endpoint" in name or "Timeout" in name or isinstance(exc, (ConnectionError, TimeoutError)):
            where = os.environ.get("AWS_ENDPOINT_URL") or "the object store"
            raise ShareError(f"{url}: {where} does not answer while {doing} ({name}: {_first_line(exc)}); check "
                             "AWS_ENDPOINT_URL and the network") from None
        raise ShareError(f"{url}: {doing} failed ({name}: {_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


#: the object stores whose first path component is a bucket (container) that must exist
BUCKETED = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"}


def _check_bucket(fs, root: str, url: str) -> None:
    """On an object store: the bucket exists (guidedrl never creates one) and these credentials may read it."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if not BUCKETED & set(protocols):
        return
    bucket = root.strip("/").split("/")[0]
    with _remote(url, f"looking for the bucket {bucket!r}"):
        try:
            fs.ls(bucket, refresh=True)  # (exists() says False where the credentials are refused: ls tells them apart)
        except FileNotFoundError:
            raise ShareError(f"{url}: the bucket {bucket!r} does not exist; create it first — guidedrl does not create "
                             "buckets") from None


def publish(path: Path, url: str, run: str | None = None) -> dict:
    """Copy the dataset directory ``path`` to ``url`` (data files first, the manifest last); ``run``: the run that made
    it (recorded in the published manifest)."""
    path = Path(path)
    manifest = read_manifest(path)
    if "datasets" in manifest:
        raise ShareError(f"{path} is a stage output holding several datasets ({', '.join(manifest['datasets'])}); "
                         f"publish one of them, e.g. {path / next(iter(manifest['datasets']))}")
    read_dataset(path, verify=True)  # never hand out a damaged dataset
    fs, root = _fs(url)
    _check_bucket(fs, root, url)
    with _remote(url, "publishing"):
        if fs.exists(_join(root, MANIFEST)):
            raise ShareError(f"{url} already holds a dataset (manifest.json exists); publish to a new URL")
        if _local(fs):
            fs.makedirs(_join(root, DATA_DIR), exist_ok=True)
        for f in data_files(path):  # an earlier publish killed halfway left some of these: they are written again
            fs.put_file(str(f), _join(root, f"{DATA_DIR}/{f.name}"))
            fault("share.publish.part")
        if (path / CARD).is_file():
            fs.put_file(str(path / CARD), _join(root, CARD))
        published = {**manifest, "published": {"from": str(path.resolve()), "run": run, "at": _now()}}
        fs.pipe_file(_join(root, MANIFEST), (json.dumps(published, indent=2, sort_keys=True) + "\n").encode())  # last: a manifest means a complete dataset
    return published


def _safe_files(manifest: dict, url: str) -> list[str]:
    files = manifest.get("files")
    if not isinstance(files, list) or not files:
        raise ShareError(f"{url}: manifest.json lists no data files")
    for name in files:
        p = PurePosixPath(str(name))
        if (not isinstance(name, str) or p.is_absolute() or ".." in p.parts or len(p.parts) != 2
                or p.parts[0] != DATA_DIR or p.suffix != ".parquet" or "\\" in name):
            raise ShareError(f"{url}: manifest.json lists {name!r}; only Parquet files directly under {DATA_DIR}/ are pulled")
    return files


def pull(url: str, path: Path, force: bool = False) -> dict:
    """Fetch the dataset at ``url`` into the new directory ``path``, verified."""
    path = Path(path)
    if path.exists() and not force:
        raise ShareError(f"{path} already exists; pull into a new directory (or --force to replace it)")
    fs, root = _fs(url)
    _check_bucket(fs, root, url)
    manifest = _read_remote_manifest(fs, root, url)
    files = _safe_files(manifest, url)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / new_name(f"{TMP_PREFIX}pull")
    try:
        (tmp / DATA_DIR).mkdir(parents=True)
        with _remote(url, "pulling"):
            for name in files:
                fs.get_file(_join(root, name), str(tmp / name))
            if fs.exists(_join(root, CARD)):
                fs.get_file(_join(root, CARD), str(tmp / CARD))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        actual = fingerprint_dataset(tmp)
        if actual != manifest.get("fingerprint"):
            raise ShareError(f"{url}: the data files do not match the manifest's fingerprint ({actual} != "
                             f"{manifest.get('fingerprint')}); the dataset was changed after it was published — refused")
        try:
            read_dataset(tmp, verify=True)
        except SchemaError as exc:
            raise ShareError(f"{url}: {exc}") from None
        if path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _read_remote_manifest(fs, root: str, url: str) -> dict:
    """The manifest at ``url`` (size-capped, parsed as JSON, of a known kind), or ``ShareError``."""
    mpath = _join(root, MANIFEST)
    with _remote(url, "reading manifest.json"):
        if not fs.exists(mpath):
            raise ShareError(f"{url}: no manifest.json; not a guidedrl dataset (or its publish has not finished)")
        if fs.size(mpath) > MAX_MANIFEST_BYTES:
            raise ShareError(f"{url}: manifest.json is larger than {MAX_MANIFEST_BYTES} bytes; refusing it")
        raw = fs.cat_file(mpath)
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShareError(f"{url}: manifest.json is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") not in SCHEMAS:
        raise ShareError(f"{url}: manifest.json names no known dataset kind (got {manifest.get('kind') if isinstance(manifest, dict) else manifest!r})")
    return manifest


def list_published(url: str) -> list[dict]:
    """The datasets published under ``url`` (a team's catalogue): every prefix below it with a manifest — name
    (relative to ``url``), kind, rows, fingerprint, created, published at, and the run it came from. Objects of a
    publish that has not finished (no manifest yet) are not listed."""
    fs, root = _fs(url)
    _check_bucket(fs, root, url)
    base = root.rstrip("/")
    with _remote(url, "listing"):
        manifests = sorted(p for p in fs.find(base) if p.rsplit("/", 1)[-1] == MANIFEST)
    out = []
    for mpath in manifests:
        prefix = mpath[: -len(MANIFEST) - 1]
        if prefix.rsplit("/", 1)[-1] == DATA_DIR:
            continue
        m = _read_remote_manifest(fs, prefix, url.rstrip("/") + "/" + prefix[len(base) + 1:])
        published = m.get("published") or {}
        out.append({"name": prefix[len(base) + 1:] or ".", "kind": m.get("kind"), "rows": m.get("num_rows"),
                    "fingerprint": m.get("fingerprint"), "created": m.get("created"), "published": published.get("at"),
                    "run": published.get("run"), "stage": m.get("stage")})
    return out


def is_url(target: str | Path) -> bool:
    """A URL of a file system other than this machine's (s3://, gs://, memory://...)."""
    text = str(target)
    return "://" in text and not text.startswith("file://")


@contextlib.contextmanager
def fetched(target: str | Path) -> Iterator[Path]:
    """A dataset directory on this machine: ``target`` itself, or a published dataset pulled (verified) into a
    temporary directory for as long as the context lasts."""
    if not is_url(target):
        yield Path(str(target).removeprefix("file://"))
        return
    with tempfile.TemporaryDirectory(prefix="guidedrl-pulled-") as tmp:
        pull(str(target), Path(tmp) / "dataset")
        yield Path(tmp) / "dataset"


def upload_dir(local: Path, url: str, last: str) -> None:
    """Copy the finished directory ``local`` to ``url`` file by file, the file ``last`` (what marks it
    complete) last; on an object store the bucket must exist."""
    fs, root = _fs(url)
    _check_bucket(fs, root, url)
    files = sorted(p for p in Path(local).rglob("*") if p.is_file())
    with _remote(url, "uploading"):
        if fs.exists(_join(root, last)):
            raise ShareError(f"{url} already holds {last}; write to a new URL")
        for f in sorted(files, key=lambda p: p.relative_to(local).as_posix() == last):
            rel = f.relative_to(local).as_posix()
            if _local(fs):
                fs.makedirs(_join(root, rel).rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(f), _join(root, rel))


def describe(path: Path) -> dict:
    """What ``diff`` compares: rows, schema, per-column statistics, the manifest's summary.
    One lazy polars query over the Parquet files (streaming engine): a dataset of millions of
    rows is never held whole; what is kept is one aggregate per column (and, for text, the
    distinct values ``n_unique`` counts)."""
    import polars as pl

    path = Path(path)
    manifest = read_manifest(path)
    files = [str(f) for f in data_files(path)]
    if not files:
        raise SchemaError(f"{path}: dataset has no data files")
    import pyarrow.dataset as pads

    from tasks.core.schemas import validate_table

    validate_table(pads.dataset(files, format="parquet").schema.empty_table(), manifest.get("kind"), path)  # the contract's columns and types
    lf = pl.scan_parquet(files)
    schema = lf.collect_schema()
    # two queries: distinct counts (text columns only) apart, so the rest runs on the streaming
    # engine — mixed with n_unique the whole select would be collected in memory, every column loaded
    exprs, distinct, kinds = [pl.len().alias("__rows")], [], {}
    for name, dtype in schema.items():
        col = pl.col(name)
        exprs.append(col.null_count().alias(f"{name}\0nulls"))
        if dtype.is_numeric():
            kinds[name] = ("mean", "min", "max")
            exprs += [col.mean().alias(f"{name}\0mean"), col.min().alias(f"{name}\0min"), col.max().alias(f"{name}\0max")]
        elif dtype == pl.Boolean:
            kinds[name] = ("true",)
            exprs.append(col.sum().alias(f"{name}\0true"))
        elif dtype == pl.String:
            kinds[name] = ("distinct",)
            distinct.append(col.n_unique().alias(f"{name}\0distinct"))
        elif isinstance(dtype, pl.List):
            kinds[name] = ("mean_length",)
            exprs.append(col.list.len().mean().alias(f"{name}\0mean_length"))
    row = lf.select(exprs).collect(engine="streaming").row(0, named=True)
    if distinct:
        row.update(lf.select(distinct).collect(engine="streaming").row(0, named=True))
    stats = {name: {"nulls": row[f"{name}\0nulls"], **{k: row[f"{name}\0{k}"] for k in kinds.get(name, ())}} for name in schema}
    for entry in stats.values():
        if "true" in entry:
            entry["true"] = int(entry["true"] or 0)
    return {"path": str(path), "kind": manifest.get("kind"), "rows": row["__rows"], "fingerprint": manifest.get("fingerprint"),
            "schema": {k: str(v) for k, v in schema.items()}, "stats": stats, "summary": manifest.get("summary", {})}