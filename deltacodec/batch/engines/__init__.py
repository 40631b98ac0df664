"""Engines: where a batch's tasks run. One small interface, one module per engine.

An engine is a context manager with ``name``, ``workers`` and one method::

    run(fn, tasks) -> iterator of (task, result or exception)

``run`` calls ``fn(task)`` for each task of the (lazy) ``tasks`` iterator in its workers, keeps
at most :func:`window` tasks in flight (so neither the listing nor the results are ever held
whole), and yields each result as soon as it finishes, in completion order. An exception means
the task could not run (its worker died); ``fn`` itself reports bad inputs in its result. On
KeyboardInterrupt the tasks not started are cancelled and the ones running are yielded when
they finish before the interrupt propagates (a second interrupt stops waiting).

* :class:`~deltacodec.batch.engines.local.LocalPool`: a process pool on this machine
  (``concurrent.futures``; nothing to install, no server).
* :class:`~deltacodec.batch.engines.raycluster.RayEngine`: Ray tasks, one per item, on a local
  cluster started on demand or on an existing one (the optional ``ray`` package).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Protocol

__all__ = ["Engine", "make_engine", "window", "default_workers"]

Result = tuple[Any, "dict[str, Any] | BaseException"]


class Engine(Protocol):
    name: str
    workers: int

    def __enter__(self) -> "Engine": ...

    def __exit__(self, *exc: object) -> None: ...

    def run(self, fn: Callable[[Any], dict[str, Any]], tasks: Iterator[Any]) -> Iterator[Result]: ...


def window(workers: int) -> int:
    """Tasks in flight: two per worker, so a worker finds its next task waiting while the driver
    records the last result; bounded whatever the number of items."""
    return 2 * max(1, workers)


def default_workers() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def make_engine(kind: str = "local", *, workers: int | None = None, address: str | None = None,
                preload: tuple[str, ...] = ()) -> Engine:
    """``kind``: "local" (process pool) or "ray" (``address`` None starts a local cluster).
    ``preload``: modules the local pool's workers import once, before any task."""
    if workers is not None and workers < 1:
        from ...errors import SldError

        raise SldError(f"workers must be at least 1, got {workers}")
    if kind == "local":
        from .local import LocalPool

        return LocalPool(workers, preload=preload)
    if kind == "ray":
        from .raycluster import RayEngine

        return RayEngine(workers, address=address)
    from ...errors import SldError

    raise SldError(f"unknown engine '{kind}', expected 'local' or 'ray'")
