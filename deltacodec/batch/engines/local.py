"""The local engine: a ``concurrent.futures`` process pool on this machine, one task per item.

Workers are started by a fork server that has imported deltacodec (and torch, for encode) once:
cheap starts, and no threads forked. They ignore Ctrl-C (the driver decides: tasks running
finish and are recorded) and die with the driver: each holds the read end of a pipe whose only
write end the driver holds, and a thread in the worker exits the process when that pipe closes.
So a driver killed with SIGKILL leaves no worker writing behind it (the fork server is not the
driver, and the pool's own queues never see the driver go), only the temporaries of the items
in flight, which the next write into their directory removes. A worker that dies (killed, out
of memory) fails the items in flight with a message saying so, and a fresh pool takes the rest.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterator

from . import Result, default_workers, window

__all__ = ["LocalPool"]


def _init_worker(lifeline: Any) -> None:
    """Worker start: ignore SIGINT, die with the driver, one thread per worker for torch."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the driver's SIGTERM handler is the CLI's, not a worker's
    # The workers share the machine: one intra-op thread each (torch reads this when imported).
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    def watch() -> None:
        try:
            lifeline.recv()  # nothing is ever sent: returns (EOFError) when the driver is gone
        except (EOFError, OSError):
            pass
        os._exit(1)

    threading.Thread(target=watch, name="sld-batch-lifeline", daemon=True).start()


def _context(preload: tuple[str, ...]) -> Any:
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        # Imported once in the fork server, so each worker starts with them loaded (torch for
        # encode: half the start-up time of a worker). Takes effect when the fork server starts.
        ctx.set_forkserver_preload(["deltacodec.batch.tasks", *preload])
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
    """``workers`` processes (default: the CPUs this process may use); ``preload``: modules the
    workers import before their first task (a missing one is skipped)."""

    name = "local"

    def __init__(self, workers: int | None = None, *, preload: tuple[str, ...] = ()) -> None:
        self.workers = workers or default_workers()
        self.preload = tuple(preload)
        self._ex: ProcessPoolExecutor | None = None
        self._lifeline: tuple[Any, Any] | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._ex is None:
            ctx = _context(self.preload)
            if self._lifeline is None:
                self._lifeline = ctx.Pipe(duplex=False)  # (read end for the workers, write end kept here)
            self._ex = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker,
                                           initargs=(self._lifeline[0],))
        return self._ex

    def __enter__(self) -> "LocalPool":
        self._executor()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            if self._ex is not None:
                ex, self._ex = self._ex, None
                ex.shutdown(wait=True, cancel_futures=True)
        finally:
            if self._lifeline is not None:
                for end in self._lifeline:
                    end.close()
                self._lifeline = None

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
