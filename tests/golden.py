"""Row digests of a workspace's stage outputs: what "the quickstart's outputs did not change" is checked against.

    python -m tests.golden WORKSPACE > tests/quickstart_rows.json

For every Parquet dataset of every stage output: its row count, the sha256 of its
rows (each row as canonical JSON, rows sorted) with every float replaced by a marker,
and per column the exact sum of its floats and of their absolute values
(``math.fsum``, so row order does not matter) — so neither store keys, file names,
row order nor Parquet encoding matter, only the rows. Texts, token ids, flags and
counts must be equal; floats (log-probs, scores, advantages, pass rates) within
``REL_TOL`` (measured: 1 thread against 2 moves the log-prob sums by ≤ 3e-8 of their
size): float32 kernels give other last bits on another CPU, and a digest of exact
float reprs would tell machines apart, not code. ``policy_id`` is left out: it is the
hash of a checkpoint's weights, whose last bits differ in the same way (the ``policy``
column says which policy a row is of). Re-make the file in the commit that changes
the quickstart's outputs on purpose, and say why there.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import pyarrow.dataset as pads

#: how far a float column's sum may move between machines (float32 rounding, not a changed computation)
REL_TOL = 1e-6
#: and at least this far, whatever its size: a log-prob is a logit less a log-sum-exp of ~log(vocabulary) ≈ 4.6, so
#: its float32 rounding is absolute (~3e-7 a token), not relative to the log-prob, and a sum of log-probs near 0 moves
#: by more than REL_TOL of itself (measured, 2026-12-06: the quickstart's one hint row, 14 tokens, sums to -2.976799 on
#: the machine that recorded the file and to -2.976802 on another — 1.02e-6 of the sum — with the same code, before
#: and after the real-tokenizer change). A changed computation moves a sum by orders of magnitude more.
ABS_TOL = 1e-5
#: columns that name a checkpoint by the hash of its weights
MACHINE_DEPENDENT = ("policy_id",)


def _split(value, floats: list[float]):
    """``value`` with each float replaced by ``"f"`` (its floats appended to ``floats``)."""
    if isinstance(value, float):
        floats.append(value)
        return "f"
    if isinstance(value, list):
        return [_split(v, floats) for v in value]
    if isinstance(value, dict):
        return {k: _split(v, floats) for k, v in value.items()}
    return value


def row_digests(workspace: Path) -> dict[str, dict]:
    """'<stage>/<dataset>' -> {rows, sha256, float_sums}; one entry per dataset (a workspace with one output per stage)."""
    out: dict[str, dict] = {}
    for manifest in sorted(Path(workspace, "store").glob("*/*/*/manifest.json")):
        dataset_dir = manifest.parent
        stage = dataset_dir.parent.parent.name
        if dataset_dir.parent.name.startswith(".") or not (dataset_dir / "data").is_dir():
            continue
        table = pads.dataset(str(dataset_dir / "data"), format="parquet").to_table()
        floats: dict[str, list[float]] = defaultdict(list)
        rows = sorted(json.dumps({k: _split(v, floats[k]) for k, v in r.items() if k not in MACHINE_DEPENDENT}, sort_keys=True)
                      for r in table.to_pylist())
        name = f"{stage}/{dataset_dir.name}"
        if name in out:
            raise ValueError(f"{workspace}: more than one output of stage {stage}; digest a workspace of one run")
        sums = {k: [repr(math.fsum(v)), repr(math.fsum(map(abs, v)))] for k, v in sorted(floats.items()) if v}
        out[name] = {"rows": len(rows), "sha256": hashlib.sha256("\n".join(rows).encode()).hexdigest(), "float_sums": sums}
    return dict(sorted(out.items()))


def _close(a: list[str], b: list[str]) -> bool:
    return a == b or all(math.isclose(float(x), float(y), rel_tol=REL_TOL, abs_tol=ABS_TOL) for x, y in zip(a, b))


def differences(now: dict[str, dict], recorded: dict[str, dict]) -> dict[str, tuple]:
    """The datasets whose rows differ: another set of datasets, row count, non-float content, or a float column's sum."""
    if now.keys() != recorded.keys():
        return {"datasets": (sorted(recorded), sorted(now))}
    out = {}
    for name, rec in recorded.items():
        cur = now[name]
        sums_ok = cur["float_sums"].keys() == rec["float_sums"].keys() and all(
            _close(cur["float_sums"][k], v) for k, v in rec["float_sums"].items())
        if cur["rows"] != rec["rows"] or cur["sha256"] != rec["sha256"] or not sums_ok:
            out[name] = (rec, cur)
    return out


if __name__ == "__main__":
    print(json.dumps(row_digests(Path(sys.argv[1])), indent=1))
