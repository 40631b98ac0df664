"""Many adapters at once: resumable, parallel ``encode``/``decode``/``verify`` of a tree.

    >>> from deltacodec import batch
    >>> s = batch.encode("hub/", "hub-sld/", bits=3, workers=8)   # local process pool
    >>> s.succeeded, s.failed, s.skipped
    >>> batch.verify("hub-sld/", "reports/", engine="ray", address="auto")

SRC is a directory tree (adapters found by layout), a glob, or a file listing paths; DST
mirrors SRC's relative paths and holds a JSON-lines manifest, appended and fsynced as results
arrive, so that a rerun skips what is done with the same source bytes and options and redoes
what changed or failed, and a killed run loses at most the items in flight. Every output is
written by :mod:`deltacodec.outputs` (atomic, never over an input). A bad adapter is recorded
with the library's error and the batch goes on.

Modules: :mod:`.listing` (finding items), :mod:`.manifest` (the log and its compact index),
:mod:`.tasks` (one item, in a worker), :mod:`.engines` (local pool, Ray), :mod:`.driver` (the
loop), :mod:`.cli` (``sld batch``). Importing this package does not import torch or ray.
"""

from __future__ import annotations

import os
from typing import Any

from .driver import BatchSummary, check_options, run
from .engines import Engine, make_engine

__all__ = ["encode", "decode", "verify", "run", "BatchSummary", "Engine", "make_engine", "check_options"]

PathLike = str | os.PathLike[str]


def encode(src: PathLike, dst: PathLike, *, engine: str | Engine = "local", workers: int | None = None,
           address: str | None = None, force: bool = False, root: str | None = None, **options: Any) -> BatchSummary:
    """Encode every adapter of ``src`` into ``dst`` (``a/b`` -> ``a/b.sld``); ``options`` are
    ``deltacodec.encode``'s (bits, level, quantizer, ...). See :func:`run`."""
    return run("encode", src, dst, options=options, engine=engine, workers=workers, address=address,
               force=force, root=root)


def decode(src: PathLike, dst: PathLike, *, engine: str | Engine = "local", workers: int | None = None,
           address: str | None = None, force: bool = False, root: str | None = None, single_file: bool = False,
           **options: Any) -> BatchSummary:
    """Decode every ``.sld`` of ``src`` into ``dst`` (``a/b.sld`` -> directory ``a/b``, or
    ``a/b.safetensors`` with ``single_file``); ``options`` are ``deltacodec.decode``'s."""
    return run("decode", src, dst, options=options, engine=engine, workers=workers, address=address,
               force=force, root=root, single_file=single_file)


def verify(src: PathLike, dst: PathLike | None = None, *, engine: str | Engine = "local", workers: int | None = None,
           address: str | None = None, force: bool = False, root: str | None = None,
           max_decoded_bytes: int | None = None) -> BatchSummary:
    """Check every section of every ``.sld`` of ``src``; with ``dst``, record results there
    (and skip, on a rerun, files verified before and unchanged since)."""
    return run("verify", src, dst, options={"max_decoded_bytes": max_decoded_bytes}, engine=engine,
               workers=workers, address=address, force=force, root=root)
