"""Handing datasets to other teams: publish, pull and diff through fsspec.

A dataset directory (``manifest.json``, ``README.md``, ``data/part-*.parquet``)
is copied file by file to any fsspec URL — a local or shared directory,
``file://``, ``memory://``, and object stores once their fsspec driver is
installed (``s3fs``, ``gcsfs``, ``adlfs``).

Pulling trusts nothing it reads: only ``manifest.json`` (parsed as JSON), the
Parquet files the manifest lists (relative paths under ``data/``, nothing
else) and ``README.md`` are fetched; no pickles, no loading scripts, no
``trust_remote_code``; the files land in a temporary directory beside the
target and are renamed into place only after their fingerprint matches the
manifest's and every file passes the schema of its kind. A dataset whose bytes
changed is refused, and nothing is ever written outside the target.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path, PurePosixPath

from tasks.core.schemas import SCHEMAS, SchemaError
from tasks.core.store import DATA_DIR, MANIFEST, TMP_PREFIX, data_files, fingerprint_dataset, read_dataset, read_manifest

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
                         "e.g. pip install s3fs") from None


def _join(root: str, rel: str) -> str:
    return root.rstrip("/") + "/" + rel


def publish(path: Path, url: str) -> dict:
    """Copy the dataset directory ``path`` to ``url`` (data files first, the manifest last)."""
    path = Path(path)
    manifest = read_manifest(path)
    if "datasets" in manifest:
        raise ShareError(f"{path} is a stage output holding several datasets ({', '.join(manifest['datasets'])}); "
                         f"publish one of them, e.g. {path / next(iter(manifest['datasets']))}")
    read_dataset(path, verify=True)  # never hand out a damaged dataset
    fs, root = _fs(url)
    if fs.exists(_join(root, MANIFEST)):
        raise ShareError(f"{url} already holds a dataset (manifest.json exists); publish to a new URL")
    fs.makedirs(_join(root, DATA_DIR), exist_ok=True)
    for f in data_files(path):
        fs.put_file(str(f), _join(root, f"{DATA_DIR}/{f.name}"))
    if (path / CARD).is_file():
        fs.put_file(str(path / CARD), _join(root, CARD))
    fs.put_file(str(path / MANIFEST), _join(root, MANIFEST))  # last: a manifest means a complete dataset
    return manifest


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
    mpath = _join(root, MANIFEST)
    if not fs.exists(mpath):
        raise ShareError(f"{url}: no manifest.json; not a guidedrl dataset")
    if fs.size(mpath) > MAX_MANIFEST_BYTES:
        raise ShareError(f"{url}: manifest.json is larger than {MAX_MANIFEST_BYTES} bytes; refusing it")
    try:
        manifest = json.loads(fs.cat_file(mpath))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShareError(f"{url}: manifest.json is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") not in SCHEMAS:
        raise ShareError(f"{url}: manifest.json names no known dataset kind (got {manifest.get('kind') if isinstance(manifest, dict) else manifest!r})")
    files = _safe_files(manifest, url)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TMP_PREFIX}pull-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        (tmp / DATA_DIR).mkdir(parents=True)
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