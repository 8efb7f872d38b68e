"""Fault-injection points: where the chaos tests kill a run (or fill its disk) on purpose.

Every writer calls ``fault(point, stage)`` at the moments that matter — a shard
written but not yet renamed, a stage output complete under its temporary name,
a checkpoint half saved, a run record being replaced. Nothing happens unless the
environment names the point::

    GUIDEDRL_FAULT=store.publish.before-rename@grade        kill -9 this run's process group there
    GUIDEDRL_FAULT=shard.before-rename@rollouts#3           ... at the third time the point is reached
    GUIDEDRL_FAULT=store.write.part@materialize=enospc      raise OSError(ENOSPC) there (a full disk)

``@stage`` and ``#n`` are optional (any stage; the first time). Several specs may
be given, comma-separated. The points (``POINTS``) are listed so a test can
check that it covers each. Never set in normal use: reading one environment
variable per call is the whole cost.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from collections import Counter

ENV = "GUIDEDRL_FAULT"

#: every point a writer offers, and the moment it stands for
POINTS = {
    "shard.before-rename": "a shard's Parquet file is written under its temporary name, not yet renamed",
    "shard.after": "a shard is finished (renamed); the next one has not started",
    "store.write.part": "a stage output's first dataset is written into its temporary directory, the rest not",
    "store.publish.before-rename": "a stage output is complete under its temporary name, not yet renamed into place",
    "store.publish.after-rename": "a stage output is published; the run record does not know it yet",
    "checkpoint.save": "a checkpoint's weights are written, its tokenizer not yet",
    "record.save.before-rename": "a run record's new version is written to its temporary name, not yet renamed",
    "share.publish.part": "a published dataset's data file is put, its manifest not yet (an object store has no rename)",
}

_hits: Counter = Counter()


def _specs() -> list[tuple[str, str | None, int, str]]:
    raw = os.environ.get(ENV, "")
    specs = []
    for item in filter(None, (s.strip() for s in raw.split(","))):
        item, _, action = item.partition("=")
        item, _, nth = item.partition("#")
        point, _, stage = item.partition("@")
        if point not in POINTS:
            raise ValueError(f"{ENV}: unknown fault point {point!r}; points: {', '.join(POINTS)}")
        specs.append((point, stage or None, int(nth or 1), action or "kill"))
    return specs


def fault(point: str, stage: str | None = None) -> None:
    """Kill the run (or raise ENOSPC) here if ``GUIDEDRL_FAULT`` names this point."""
    if ENV not in os.environ:
        return
    for want, want_stage, nth, action in _specs():
        if want != point or (want_stage and want_stage != stage):
            continue
        _hits[(want, want_stage)] += 1
        if _hits[(want, want_stage)] != nth:
            continue
        if action == "enospc":
            raise OSError(errno.ENOSPC, f"No space left on device (injected at {point}" + (f"@{stage})" if stage else ")"))
        sys.stderr.write(f"{ENV}: killing process group {os.getpgrp()} at {point}" + (f"@{stage}" if stage else "") + "\n")
        sys.stderr.flush()
        os.killpg(os.getpgrp(), signal.SIGKILL)
