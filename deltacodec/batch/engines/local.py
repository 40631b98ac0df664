"""The local engine: a ``concurrent.futures`` process pool on this machine, one task per item.

Workers are started by a fork server that has imported deltacodec once (cheap starts, no
threads forked), ignore Ctrl-C (the driver decides: tasks running finish and are recorded), and
on Linux die with the driver (``PR_SET_PDEATHSIG``): a driver killed with SIGKILL leaves no
worker writing behind it, only the temporaries of the items in flight, which the next write
into their directory removes. A worker that dies (killed, out of memory) fails the items in
flight with a message saying so, and a fresh pool takes the rest.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterator

from . import Result, default_workers, window

__all__ = ["LocalPool"]

_PR_SET_PDEATHSIG = 1


def _init_worker() -> None:
    """Worker start: ignore SIGINT, die with the parent, one thread per worker for torch."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The workers share the machine: one intra-op thread each (torch reads this when imported).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
        if os.getppid() == 1:  # the parent died before the line above: do not linger
            os._exit(1)


def _context() -> Any:
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        # Imported once in the fork server, so each worker starts with deltacodec loaded.
        ctx.set_forkserver_preload(["deltacodec.batch.tasks"])
        return ctx
    return multiprocessing.get_context("spawn")


def _outcome(fut: Future) -> "dict[str, Any] | BaseException":
    exc = fut.exception()
    if isinstance(exc, BrokenProcessPool):
        return BrokenProcessPool(
            "a worker process died while this item was in flight (killed, or out of memory); rerun the batch to retry it"
        )
    return exc if exc is not None else fut.result()


class LocalPool:
    """``workers`` processes (default: the CPUs this process may use)."""

    name = "local"

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or default_workers()
        self._ex: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._ex is None:
            self._ex = ProcessPoolExecutor(self.workers, mp_context=_context(), initializer=_init_worker)
        return self._ex

    def __enter__(self) -> "LocalPool":
        self._executor()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._ex is not None:
            ex, self._ex = self._ex, None
            ex.shutdown(wait=True, cancel_futures=True)

    def run(self, fn: Callable[[Any], dict[str, Any]], tasks: Iterator[Any]) -> Iterator[Result]:
        pending: dict[Future, Any] = {}
        limit = window(self.workers)
        source = iter(tasks)
        more = True

        def fill() -> None:
            nonlocal more
            while more and len(pending) < limit:
                try:
                    task = next(source)
                except StopIteration:
                    more = False
                    return
                pending[self._executor().submit(fn, task)] = task

        fill()
        while pending:
            try:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
            except KeyboardInterrupt:
                yield from self._drain(pending)
                raise
            broken = False
            for fut in done:
                task = pending.pop(fut)
                broken |= isinstance(fut.exception(), BrokenProcessPool)
                yield task, _outcome(fut)
            if broken:
                # Every other future of a broken pool fails too (the pool says so promptly): report
                # them, then go on with a fresh pool.
                if pending:
                    wait(pending)
                    for fut, task in list(pending.items()):
                        pending.pop(fut)
                        yield task, _outcome(fut)
                if self._ex is not None:
                    self._ex.shutdown(wait=False, cancel_futures=True)
                    self._ex = None
            fill()

    def _drain(self, pending: dict[Future, Any]) -> Iterator[Result]:
        """After Ctrl-C: cancel what has not started, yield what is running when it finishes."""
        for fut in list(pending):
            if fut.cancel():
                pending.pop(fut)
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                task = pending.pop(fut)
                if not fut.cancelled():
                    yield task, _outcome(fut)
