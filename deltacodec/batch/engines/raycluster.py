"""The Ray engine: one Ray task per item (``num_cpus=1``), results taken with ``ray.wait`` as
they finish. ``address=None`` starts a local cluster for the run (``ray.init(address="local")``)
and stops it after; an address (``ray://host:10001``, ``host:6379``, ``auto``) joins an
existing cluster, where deltacodec (the same version: records carry it) must be installed on
every node and SRC and DST must be on a file system every node mounts at the same path. When
Ray is already initialised in this process, that session is used as it is.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

from ...errors import SldError
from . import Result, window

__all__ = ["RayEngine"]

# A task whose worker process dies is run once more (Ray's retry); a second death fails it.
_MAX_RETRIES = 1


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SldError(
            "the Ray engine needs the 'ray' package: pip install 'deltacodec[ray]' (or pip install ray)"
        ) from None
    return ray


class RayEngine:
    """``workers``: tasks in flight are twice this (default: the cluster's CPUs); on a local
    cluster also the CPUs it is given. ``address``: an existing cluster, or None for a local one."""

    name = "ray"

    def __init__(self, workers: int | None = None, *, address: str | None = None) -> None:
        self.address = address
        self.workers = workers or 0
        self._started = False

    def __enter__(self) -> "RayEngine":
        ray = _ray()
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
            if self.address is None:
                kwargs["address"] = "local"
                if self.workers:
                    kwargs["num_cpus"] = self.workers
            else:
                kwargs["address"] = self.address
            try:
                ray.init(**kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = self.address or "a local cluster"
                raise SldError(f"cannot start Ray on {where}: {exc}") from None
            self._started = True
        if not self.workers:
            self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._started:
            self._started = False
            _ray().shutdown()

    def run(self, fn: Callable[[Any], dict[str, Any]], tasks: Iterator[Any]) -> Iterator[Result]:
        ray = _ray()
        remote = ray.remote(num_cpus=1, max_retries=_MAX_RETRIES)(fn)
        pending: dict[Any, Any] = {}
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
                pending[remote.remote(task)] = task

        fill()
        while pending:
            try:
                done, _ = ray.wait(list(pending), num_returns=1)
            except KeyboardInterrupt:
                for ref in pending:
                    ray.cancel(ref)
                raise
            for ref in done:
                task = pending.pop(ref)
                try:
                    yield task, ray.get(ref)
                except ray.exceptions.RayError as exc:
                    yield task, RuntimeError(f"Ray could not run this item: {type(exc).__name__}: {exc}")
            fill()
