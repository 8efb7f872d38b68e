"""The store's locks: one advisory ``flock`` per output being computed, ``<store>/<stage>/.lock-<key>``.

The kernel releases a flock when its holder ends, however it ends: a killed run never leaves a lock
that blocks. ``gc`` unlinks lock files nobody holds (``unlink_unheld``: taken, then unlinked while
held); a process that opened the file just before and locks it just after holds a lock on a removed
file, so ``hold`` checks that the file it locked is still the one at the path, and locks again if not
— two writers of one key cannot both hold a lock.

On a shared workspace the file system must give POSIX advisory locks across its clients (NFSv4;
Lustre mounted with ``flock``; CephFS; not every FUSE mount). ``check_locking`` tries one at start-up:
a file system that refuses is an error, a FUSE mount a warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path
from typing import Iterator

log = logging.getLogger("guidedrl.store")

NO_LOCKS = ("a shared workspace needs POSIX advisory locks across hosts (NFSv4, Lustre mounted with flock, CephFS; "
            "docs/operations.md)")


def _same_file(fh, path: Path) -> bool:
    """Whether the open file ``fh`` is still the file at ``path``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fh.fileno())
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


@contextlib.contextmanager
def hold(path: Path, waiting: str) -> Iterator[None]:
    """Hold the exclusive lock of ``path`` (created if missing) while the block runs; ``waiting`` is logged if
    another process holds it (this one then waits)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        with open(path, "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info(waiting)
                fcntl.flock(fh, fcntl.LOCK_EX)
            except OSError as exc:
                raise OSError(exc.errno, f"{path}: cannot take a lock ({exc.strerror}); {NO_LOCKS}") from None
            if not _same_file(fh, path):  # unlinked (gc) between our open and our lock: lock the file there now
                continue
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
            return


def held(path: Path) -> bool:
    """Whether a process (on any host sharing the file system) holds the lock of ``path`` now."""
    try:
        fh = open(path, "r")
    except FileNotFoundError:
        return False
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


def unlink_unheld(path: Path, dry_run: bool = False) -> bool:
    """Remove the lock file ``path`` if no process holds its lock (checked by taking it; unlinked while held)."""
    try:
        with open(path, "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            if not dry_run:
                path.unlink(missing_ok=True)
            return True
    except OSError:
        return False


def file_system(path: Path) -> str:
    """The type of the file system ``path`` is on (from /proc/self/mountinfo; "" when unknown)."""
    try:
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return ""
    target, best, kind = str(Path(path).resolve()), "", ""
    for line in mounts:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        point = fields[4].replace("\\040", " ")
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, right.split()[0]
    return kind


def check_locking(root: Path) -> None:
    """Take and release one lock in ``root`` (the store): an error naming what the file system must provide if it
    cannot; a warning on a FUSE mount, whose locks may hold on one client only."""
    import tempfile

    root.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.NamedTemporaryFile(dir=root, prefix=".lockcheck-") as fh:  # this process's own: removed on close
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fh, fcntl.LOCK_UN)
    except OSError as exc:
        raise OSError(exc.errno, f"{root}: the store's file system refuses locks ({exc.strerror}); {NO_LOCKS}") from None
    kind = file_system(root)
    if kind.startswith("fuse"):
        log.warning("%s is on a %s mount: its locks may not hold across hosts; %s", root, kind, NO_LOCKS)
