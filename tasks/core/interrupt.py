"""Stopping means stopping: SIGTERM (what `timeout`, a Prefect worker's cancel and a cluster scheduler
send) and SIGINT (Ctrl-C) end a `guidedrl run` / `online` within seconds.

``install(on_stop)`` (the CLI, around a flow) turns either signal into: the stop flag set — every
request loop run by ``run_cancellable`` (the policy and judge clients) cancels its in-flight
requests, and the shard loops stop taking work —; ``KeyboardInterrupt`` raised in the main thread,
so the flow unwinds; and a watchdog that ends the process after ``grace`` seconds whatever still
runs (a worker thread blocked in a read, Prefect's event service draining to a server that is
gone). ``on_stop`` runs once, first (it records the run as interrupted); then every process the run
started (its temporary Prefect server, launched training ranks, served policies) is ended with it
(``end_descendants``): the process ends by ``os._exit``, which runs no ``atexit`` clean-up. Nothing half-written
survives either way: every write goes to a temporary name and is renamed, and the store's locks
are released by the kernel when the process ends.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from typing import Any, Callable, Coroutine

STOP = threading.Event()
SIGNAL: int | None = None  # the signal that asked for the stop


class Interrupted(KeyboardInterrupt):
    """Work stopped because a stop was requested (a signal)."""


def check() -> None:
    """Raise ``Interrupted`` when a stop was requested (between units of work)."""
    if STOP.is_set():
        raise Interrupted("stop requested")


def run_cancellable(coro: Coroutine) -> Any:
    """``asyncio.run(coro)``, cancelled (in-flight requests dropped) as soon as a stop is requested:
    raises ``Interrupted`` then."""
    async def main():
        task = asyncio.ensure_future(coro)
        while not task.done():
            if STOP.is_set():
                task.cancel()
                break
            await asyncio.wait({task}, timeout=0.2)
        try:
            return await task
        except asyncio.CancelledError:
            raise Interrupted("stop requested: requests in flight cancelled") from None

    check()
    return asyncio.run(main())


_ON_STOP: Callable[[int], None] | None = None
_GRACE = 10.0
_REQUESTED = threading.Lock()


def is_stop(exc: BaseException) -> bool:
    """Whether ``exc`` is a stop (a signal) rather than a failure: ``KeyboardInterrupt``, Prefect's
    ``TerminationSignal`` (its flow engine turns SIGTERM into one), or anything raised once a stop was requested."""
    return isinstance(exc, KeyboardInterrupt) or type(exc).__name__ == "TerminationSignal" or STOP.is_set()


def request_stop(signum: int) -> None:
    """Set the stop flag (request loops cancel, shard loops stop) and arm the watchdog that ends the process after
    the grace period whatever still runs. Idempotent."""
    global SIGNAL
    if not _REQUESTED.acquire(blocking=False):
        return
    SIGNAL = signum
    STOP.set()
    timer = threading.Timer(_GRACE, finish, args=(signum,))
    timer.daemon = True
    timer.start()


def install(on_stop: Callable[[int], None] | None = None, grace: float = 10.0) -> None:
    """SIGTERM and SIGINT stop the process (see the module doc); ``on_stop(signum)`` runs once, first.
    A second signal ends the process at once. (Inside a flow run Prefect's engine puts its own SIGTERM
    handler in front of this one; the flow's shard fan-out requests the stop when that handler's
    ``TerminationSignal`` reaches it, and the engine hands the signal on to this handler as it unwinds.)"""
    global _ON_STOP, _GRACE
    if threading.current_thread() is not threading.main_thread():
        return
    _ON_STOP, _GRACE = on_stop, grace
    fired = threading.Event()

    def handler(signum, frame):
        if fired.is_set():
            os._exit(128 + signum)
        fired.set()
        request_stop(signum)
        name = signal.Signals(signum).name
        print(f"\n{name}: stopping (in-flight requests cancelled; finished shards kept; the next run resumes)", file=sys.stderr,
              flush=True)
        raise Interrupted(name)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


_FINISHED = threading.Lock()


def finish(signum: int | None = None) -> None:
    """Record (the ``on_stop`` that ``install`` was given), flush and end the process now: no wait on worker
    threads or on Prefect's services. Runs once, from the main thread's unwinding or from the watchdog,
    whichever comes first; ``signum`` defaults to the signal that asked for the stop."""
    if not _FINISHED.acquire(blocking=False):
        return
    signum = signum or SIGNAL or signal.SIGINT
    try:
        if _ON_STOP is not None:
            _ON_STOP(signum)
    except Exception as exc:  # the exit must happen
        print(f"while stopping: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    finally:
        end_descendants()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + signum)


def end_descendants(grace: float = 5.0) -> int:
    """End every process this one started, and theirs: SIGTERM, then SIGKILL to what still runs after ``grace``
    seconds. Returns how many there were."""
    import psutil

    try:
        procs = psutil.Process().children(recursive=True)
    except psutil.Error:
        return 0
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    return len(procs)
