"""The batch driver: list SRC, decide per item (skip, redo, or new), hand tasks to an engine,
record each result in the manifest as it arrives, and count.

Memory is bounded whatever the number of items: the listing is streamed, at most
``engines.window(workers)`` tasks are in flight, a result is written and dropped as soon as it
arrives (the summary keeps counts and the first :data:`MAX_LISTED_FAILURES` failures), and the
one thing that grows with the batch is the manifest's compact :class:`~.manifest.Index`.
"""

from __future__ import annotations

import collections
import inspect
import json
import os
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import numpy as np

from .. import __version__
from ..errors import DecodeError, DeltacodecWarning, EncodeError, OutputError, SldError
from ..outputs import check_output, clean_leftovers
from .engines import Engine, make_engine
from .listing import Item, Source, open_source
from .manifest import Index, Manifest, digest8, item_key
from .tasks import OPS, Task, failure_record, fingerprint, output_size, run_task, source_files

__all__ = ["run", "BatchSummary", "check_options", "output_rel", "count_items", "MAX_LISTED_FAILURES"]

MAX_LISTED_FAILURES = 20
#: Test hook (the kill-and-rerun tests): after this many results are recorded the driver stops
#: and waits to be killed, so a test kills it midway without racing it.
PAUSE_ENV = "DELTACODEC_BATCH_TEST_PAUSE_AFTER"
PAUSE_MARK = "deltacodec-batch: paused for a test"
_NOT_OPTIONS = {"encode": ("src", "out", "progress", "force"), "decode": ("path", "out", "progress", "force")}


@dataclass
class BatchSummary:
    """What a batch did. ``skipped``: items done before with the same source bytes and options
    (including those touched but unchanged); ``failures``: the first failed items (source,
    error); every failure is in the manifest."""

    op: str
    src: str
    dst: str | None
    manifest: str | None
    engine: str
    workers: int
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    failures: list[dict[str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.succeeded + self.failed + self.skipped

    def to_dict(self) -> dict[str, Any]:
        return {
            "op": self.op, "src": self.src, "dst": self.dst, "manifest": self.manifest,
            "engine": self.engine, "workers": self.workers, "total": self.total,
            "succeeded": self.succeeded, "failed": self.failed, "skipped": self.skipped,
            "bytes_out": self.bytes_out, "seconds": round(self.seconds, 3), "failures": self.failures,
            "ok": self.failed == 0,
        }


# ----------------------------------------------------------------------------------------------
# Options


def _params(op: str) -> dict[str, inspect.Parameter]:
    from .. import codec

    fn = {"encode": codec.encode, "decode": codec.decode}[op]
    return {k: p for k, p in inspect.signature(fn).parameters.items()
            if k not in _NOT_OPTIONS[op] and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def check_options(op: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options of ``op`` as every task gets them: each keyword the library function takes
    (``deltacodec.encode``/``decode``, whatever they take in this version), with its default
    when not given; checked once here, before any item: unknown names, values that are not plain
    JSON, and a dry run of the library call on a tiny adapter (so that a bad value fails the
    batch once, not every item)."""
    err = {"encode": EncodeError, "decode": DecodeError}.get(op, SldError)
    if op == "verify":
        params = {"max_decoded_bytes": None}
    else:
        params = {k: (None if p.default is p.empty else p.default) for k, p in _params(op).items()}
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise err(f"unknown {op} option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                  f"{op} takes {', '.join(sorted(params)) or 'none'}")
    canonical = {k: options.get(k, d) for k, d in sorted(params.items())}
    try:
        json.dumps(canonical, allow_nan=False)
    except (TypeError, ValueError):
        raise err(f"{op} options must be plain numbers, strings, booleans or None, got {canonical!r}") from None
    mdb = canonical.get("max_decoded_bytes")
    if mdb is not None and (isinstance(mdb, bool) or not isinstance(mdb, int) or mdb < 1):
        raise err(f"max_decoded_bytes must be a positive integer, got {mdb!r}")
    if op != "verify":
        _dry_run(op, canonical)
    return canonical


def _dry_run(op: str, options: dict[str, Any]) -> None:
    """The library call on a tiny in-memory adapter, in a temporary directory: its option checks
    raise here, once."""
    from .. import codec
    from ..adapter import Adapter, AdapterModule

    rng = np.random.default_rng(0)
    m = AdapterModule("m", rng.standard_normal((1, 4)).astype(np.float32), rng.standard_normal((4, 1)).astype(np.float32), 1.0)
    with tempfile.TemporaryDirectory(prefix="sld-batch-check-") as tmp:
        path = os.path.join(tmp, "check.sld")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if op == "encode":
                codec.encode(Adapter([m]), out=path, **options)
            else:
                codec.encode(Adapter([m]), out=path)
                # The size limit is a property of the files, not an option to check on this one.
                codec.decode(path, os.path.join(tmp, "out"), **{**options, "max_decoded_bytes": None})


# ----------------------------------------------------------------------------------------------
# Paths


def output_rel(op: str, item: Item, *, single_file: bool = False) -> str | None:
    """Where an item's output goes under DST (None for verify): an adapter directory ``a/b`` or
    file ``a/b.safetensors`` encodes to ``a/b.sld``; ``a/b.sld`` decodes to the directory
    ``a/b`` (or ``a/b.safetensors`` with ``single_file``)."""
    rel = item.rel
    if op == "encode":
        if os.path.isdir(item.path):
            return rel + ".sld"
        base, ext = os.path.splitext(rel)
        return (base if ext in (".safetensors", ".bin") else rel) + ".sld"
    if op == "decode":
        base = rel[: -len(".sld")] if rel.endswith(".sld") and len(rel) > 4 else rel + "-decoded"
        return base + (".safetensors" if single_file else "")
    return None


def _what(op: str) -> str:
    return "adapters" if op == "encode" else "sld"


def count_items(op: str, src: str, *, root: str | None = None, dst: str | None = None) -> int:
    """How many items SRC lists (a streamed pass; for a progress bar's total)."""
    return sum(1 for _ in open_source(src, _what(op), root=root, exclude=dst).items())


# ----------------------------------------------------------------------------------------------
# The run


class _Run:
    """State of one run: the manifest, the index, the counts, the progress."""

    def __init__(self, op: str, source: Source, dst: str | None, manifest: Manifest | None, index: Index,
                 summary: BatchSummary, options: dict[str, Any], force: bool, single_file: bool,
                 progress: Callable[[int, int, str], None] | None, total: int | None,
                 on_result: Callable[[dict[str, Any]], None] | None) -> None:
        self.op, self.source, self.dst, self.manifest, self.index = op, source, dst, manifest, index
        self.summary, self.options, self.force, self.single_file = summary, options, force, single_file
        self.options_json = json.dumps(options, sort_keys=True, allow_nan=False)
        self.progress, self.total, self.on_result = progress, total, on_result
        self.done = 0
        self.cleaned: collections.OrderedDict[str, None] = collections.OrderedDict()
        pause = os.environ.get(PAUSE_ENV, "")
        self.pause_after = int(pause) if pause.isdigit() else None

    # -- deciding

    def tasks(self) -> Iterator[Task]:
        for item in self.source.items():
            task = self._task_for(item)
            if task is not None:
                yield task

    def _task_for(self, item: Item) -> Task | None:
        base = Task(self.op, item.path, item.rel, None, None, self.options)
        if item.problem is not None:
            self.finish(failure_record(base, item.problem))
            return None
        out_rel = output_rel(self.op, item, single_file=self.single_file)
        out = os.path.join(self.dst, *out_rel.split("/")) if out_rel is not None and self.dst else None
        opt_id = digest8(self.op, item.rel, self.options_json, __version__)
        task = replace(base, output=out, out_rel=out_rel, options_id=opt_id.hex())
        state = self.index.claim(item_key(self.op, item.rel, out_rel))
        if state is False:
            what = f"its output {out_rel}" if out_rel else "it"
            self.finish(failure_record(base, f"{item.path}: another input of this batch already claimed {what} "
                                             "(listed twice, or two inputs with the same name)"))
            return None
        force, expect = self.force, None
        if state is not None and not self.force:
            force = state.owned
            if state.done and state.options_id == opt_id and (out is None or output_size(out) == state.out_bytes):
                try:
                    same = fingerprint(source_files(self.op, item.path)) == state.fingerprint
                except OSError:
                    same = False  # the worker reports what is wrong with it
                if same:
                    self.summary.skipped += 1
                    self._tick(item.rel)
                    return None
                if out is not None:
                    expect = (state.source_id.hex(), state.out_bytes)
        if out is not None:
            self._clean(os.path.dirname(out))
            if not force and self.manifest is not None:
                # Before a worker may write it: the output is the batch's, even if this run dies
                # before its result is recorded (the rerun may then replace it).
                self.manifest.append({"op": self.op, "source": item.rel, "output": out_rel, "status": "started",
                                      "options_id": task.options_id}, sync=False)
        return replace(task, force=force, expect=expect)

    def _clean(self, parent: str) -> None:
        """Remove temporaries of killed runs from an output directory, once per directory (the
        last few remembered: items come grouped by directory)."""
        if parent in self.cleaned:
            return
        self.cleaned[parent] = None
        if len(self.cleaned) > 64:
            self.cleaned.popitem(last=False)
        clean_leftovers(parent)

    # -- recording

    def finish(self, rec: dict[str, Any]) -> None:
        if rec.get("deltacodec") != __version__ and rec["status"] != "failed":
            rec = dict(rec, status="failed", error=f"the worker runs deltacodec {rec.get('deltacodec')}, this "
                                                   f"driver {__version__}: install the same version everywhere")
        if self.manifest is not None:
            self.manifest.append(rec)
        s = self.summary
        if rec["status"] == "ok":
            s.succeeded += 1
            s.bytes_out += rec.get("bytes") or 0
        elif rec["status"] == "unchanged":
            s.skipped += 1
        else:
            s.failed += 1
            if len(s.failures) < MAX_LISTED_FAILURES:
                s.failures.append({"source": rec["source"], "error": rec.get("error") or ""})
        for w in rec.get("warnings") or ():
            warnings.warn(w, DeltacodecWarning, stacklevel=2)
        if self.on_result is not None:
            self.on_result(rec)
        self._tick(rec["source"])
        self.done += 1
        if self.pause_after is not None and self.done >= self.pause_after:
            print(PAUSE_MARK, file=sys.stderr, flush=True)
            threading.Event().wait()  # until the test kills this process

    def _tick(self, name: str) -> None:
        if self.progress is not None and self.total:
            self.progress(min(self.summary.total, self.total), self.total, name)


def run(
    op: str,
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str] | None = None,
    *,
    options: dict[str, Any] | None = None,
    engine: str | Engine = "local",
    workers: int | None = None,
    address: str | None = None,
    force: bool = False,
    root: str | None = None,
    single_file: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    total: int | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> BatchSummary:
    """Run ``op`` ("encode", "decode", "verify") on every item of ``src`` into ``dst``.

    ``src``: a directory tree, a glob, or a file listing paths (see
    :func:`~.listing.open_source`); ``dst`` mirrors its relative paths and holds the manifest
    (optional for verify: without it nothing is written and nothing is skipped). ``options``:
    keyword arguments of ``deltacodec.encode``/``decode`` (``max_decoded_bytes`` for verify),
    checked once before any item. ``engine``: "local" (a process pool of ``workers``), "ray"
    (``address`` None: a local cluster), or an entered :class:`Engine`. ``force``: redo every item
    and replace existing outputs. ``progress(i, n, name)`` is called per item when ``total`` is
    given; ``on_result(record)`` per result. Items that fail are recorded and counted; the run
    raises only for what stops the whole batch (SRC unusable, DST refused, bad options).
    """
    if op not in OPS:
        raise SldError(f"unknown batch op '{op}', expected one of {', '.join(OPS)}")
    src, dst = os.fspath(src), (os.fspath(dst) if dst is not None else None)
    if dst is None and op != "verify":
        raise SldError(f"batch {op} needs DST, the directory its outputs go to")
    opts = check_options(op, dict(options or {}))
    source = open_source(src, _what(op), root=root, exclude=dst)
    manifest, index = None, Index()
    if dst is not None:
        # DST may exist (a rerun); it is never SRC, inside it, nor holds it.
        check_output(dst, list(source.inputs), force=True, kind="dir")
        try:
            os.makedirs(dst, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{dst}: cannot create the directory: {exc.strerror or exc}") from None
        manifest = Manifest(dst, op, inputs=source.inputs)
        index = manifest.read_index()
    owned = isinstance(engine, str)
    # Encoding reads adapters through torch (safetensors' torch loader): imported once, up front.
    preload = ("torch",) if op == "encode" else ()
    eng = make_engine(engine, workers=workers, address=address, preload=preload) if owned else engine
    summary = BatchSummary(op, src, dst, manifest.path if manifest else None, eng.name, 0)
    state = _Run(op, source, dst, manifest, index, summary, opts, force, single_file, progress, total, on_result)
    t0 = time.perf_counter()
    try:
        if owned:
            eng.__enter__()
        summary.workers = eng.workers
        for task, outcome in eng.run(run_task, state.tasks()):
            if isinstance(outcome, BaseException):
                outcome = failure_record(task, f"{task.source}: {outcome}")
            state.finish(outcome)
    finally:
        summary.seconds = time.perf_counter() - t0
        try:
            if owned:
                eng.__exit__(*sys.exc_info())
        finally:
            if manifest is not None:
                manifest.close()
    return summary
