"""Row digests of a workspace's stage outputs: what "the quickstart's outputs did not change" is checked against.

    python -m tests.golden WORKSPACE > tests/quickstart_rows.json

For every Parquet dataset of every stage output: its row count and the sha256 of
its rows (each row as canonical JSON, rows sorted), so neither store keys, file
names, row order nor Parquet encoding matter — only the rows. Re-make the file in
the commit that changes the quickstart's outputs on purpose, and say why there.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pyarrow.dataset as pads


def _canonical(value):
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    return value


def row_digests(workspace: Path) -> dict[str, dict]:
    """'<stage>/<dataset>' -> {rows, sha256}; one entry per dataset (a workspace with one output per stage)."""
    out: dict[str, dict] = {}
    for manifest in sorted(Path(workspace, "store").glob("*/*/*/manifest.json")):
        dataset_dir = manifest.parent
        stage = dataset_dir.parent.parent.name
        if dataset_dir.parent.name.startswith(".") or not (dataset_dir / "data").is_dir():
            continue
        table = pads.dataset(str(dataset_dir / "data"), format="parquet").to_table()
        rows = sorted(json.dumps(_canonical(r), sort_keys=True) for r in table.to_pylist())
        name = f"{stage}/{dataset_dir.name}"
        if name in out:
            raise ValueError(f"{workspace}: more than one output of stage {stage}; digest a workspace of one run")
        out[name] = {"rows": len(rows), "sha256": hashlib.sha256("\n".join(rows).encode()).hexdigest()}
    return dict(sorted(out.items()))


if __name__ == "__main__":
    print(json.dumps(row_digests(Path(sys.argv[1])), indent=1))
