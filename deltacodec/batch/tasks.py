"""One item of a batch, as a worker runs it: checksum the source, do the op through the library,
checksum the output, and return the manifest record. Runs in any engine's worker process.

A task never raises for a bad input: a library error (:class:`SldError`), a file that cannot be
read or written (``OSError``), bad values, memory, or a missing optional package become a
``failed`` record with the library's one-line message, and the batch goes on. Any other
exception is a bug in deltacodec; it is recorded too (a batch of a million adapters should not
stop for one), marked as a bug, and the driver warns about it.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

from .. import __version__
from ..cli_text import one_line
from ..errors import DeltacodecWarning, SldError
from .manifest import digest8

__all__ = ["Task", "run_task", "failure_record", "source_files", "fingerprint", "output_size", "OPS"]

OPS = ("encode", "decode", "verify")
#: Files of an adapter directory that the source checksum covers: the weights and configs the
#: readers look at (not checkpoints' optimizer states or logs).
SOURCE_SUFFIXES = (".safetensors", ".bin", ".json")
_CHUNK = 1 << 20
_MAX_WARNINGS = 20
# What a bad input raises, reported as the item's error (the CLI's rule for one-line errors).
_REPORTED = (SldError, OSError, ValueError, MemoryError, RecursionError, ImportError)


@dataclass(frozen=True)
class Task:
    """One item for a worker. ``source``: the path to read; ``rel``/``out_rel``: the item's and
    its output's paths relative to SRC's root and DST (what the manifest records); ``output``:
    the path to write (None for verify); ``options``: keyword arguments of the library call;
    ``force``: replace an existing output (one this batch wrote, or --force); ``expect``: the
    recorded (source SHA-256 prefix, output bytes) of an item whose files were touched: when
    the checksum and the output's size are the same, nothing is redone ("unchanged")."""

    op: str
    source: str
    rel: str
    output: str | None
    out_rel: str | None
    options: dict[str, Any] = field(default_factory=dict)
    options_id: str = ""
    force: bool = False
    expect: tuple[str, int] | None = None


# ----------------------------------------------------------------------------------------------
# What the source is, and checksums


def source_files(op: str, path: str) -> list[tuple[str, str]]:
    """(name, path) of the files that make the item, sorted: for encode, an adapter directory's
    weights and configs (:data:`SOURCE_SUFFIXES`, directly in it), or a standalone file with the
    ``adapter_config.json`` beside it if there is one; for decode and verify, the file."""
    if op == "encode" and os.path.isdir(path):
        out = []
        with os.scandir(path) as it:
            for e in it:
                if e.name.endswith(SOURCE_SUFFIXES) and e.is_file():
                    out.append((e.name, e.path))
        return sorted(out)
    files = [(os.path.basename(path), path)]
    if op == "encode":
        cfg = os.path.join(os.path.dirname(path), "adapter_config.json")
        if os.path.basename(path) != "adapter_config.json" and os.path.isfile(cfg):
            files.append(("adapter_config.json", cfg))
    return files


def fingerprint(files: Iterable[tuple[str, str]]) -> bytes:
    """8 bytes from each file's name, size, mtime and inode: changes when a file is rewritten,
    replaced or touched. The skip test: an equal fingerprint means the bytes were not looked at
    again (as make and rsync do); a different one sends the item to a worker, which compares
    checksums before redoing anything."""
    parts: list[str] = []
    for name, p in files:
        st = os.stat(p)
        parts.append(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}")
    return digest8(*parts)


def _hash_file(h: Any, path: str) -> int:
    n = 0
    with open(path, "rb") as fh:
        while True:
            b = fh.read(_CHUNK)
            if not b:
                return n
            h.update(b)
            n += len(b)


def checksum(files: list[tuple[str, str]]) -> str:
    """SHA-256 hex: of the file's bytes for one file (what ``sha256sum`` prints); for several,
    of each name, its bytes and their length in turn."""
    h = hashlib.sha256()
    if len(files) == 1:
        _hash_file(h, files[0][1])
        return h.hexdigest()
    for name, p in files:
        h.update(name.encode("utf-8", "surrogateescape") + b"\0")
        n = _hash_file(h, p)
        h.update(n.to_bytes(8, "little"))
    return h.hexdigest()


def _tree_files(path: str) -> list[tuple[str, str]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for f in sorted(filenames):
            p = os.path.join(dirpath, f)
            out.append((os.path.relpath(p, path).replace(os.sep, "/"), p))
    return out


def output_size(path: str | None) -> int | None:
    """Bytes of an output (a file, or the files of a directory); None when it is missing."""
    if path is None:
        return 0
    try:
        st = os.stat(path)
    except OSError:
        return None
    if stat.S_ISDIR(st.st_mode):
        try:
            return sum(os.path.getsize(p) for _, p in _tree_files(path))
        except OSError:
            return None
    return st.st_size


def _output_checksum(path: str) -> str:
    return checksum(_tree_files(path) if os.path.isdir(path) else [(os.path.basename(path), path)])


# ----------------------------------------------------------------------------------------------
# Running one task


def _record(task: Task, status: str, **kw: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "op": task.op,
        "source": task.rel,
        "output": task.out_rel,
        "status": status,
        "source_sha256": None,
        "fingerprint": None,
        "options": task.options,
        "options_id": task.options_id,
        "output_sha256": None,
        "bytes": None,
        "seconds": 0.0,
        "error": None,
        "warnings": [],
        "deltacodec": __version__,
    }
    rec.update(kw)
    return rec


def failure_record(task: Task, message: str, **kw: Any) -> dict[str, Any]:
    """The record of a task that failed outside the library call (its worker died, a listing
    problem, an output two inputs want)."""
    return _record(task, "failed", error=one_line(message), **kw)


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, SldError):
        names = [os.fsdecode(n) for n in (exc.filename, exc.filename2) if isinstance(n, (str, bytes))]
        return ": ".join(([" -> ".join(names)] if names else []) + [exc.strerror or str(exc)])
    if isinstance(exc, MemoryError):
        return "out of memory" + (f": {exc}" if str(exc) else "")
    return str(exc) or type(exc).__name__


def _do(task: Task) -> None:
    from .. import codec

    if task.op == "encode":
        codec.encode(task.source, out=task.output, force=task.force, **task.options)
    elif task.op == "decode":
        codec.decode(task.source, task.output, force=task.force, **task.options)
    elif task.op == "verify":
        from ..format import SldFile

        with SldFile(task.source, max_decoded_bytes=task.options.get("max_decoded_bytes")) as f:
            f.verify()
    else:
        raise SldError(f"unknown batch op '{task.op}', expected one of {', '.join(OPS)}")


def run_task(task: Task) -> dict[str, Any]:
    """Do one item and return its manifest record (never raises for a bad input)."""
    t0 = time.perf_counter()
    caught: list[str] = []
    known: dict[str, Any] = {}  # what was learnt about the source before a failure
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", DeltacodecWarning)
        try:
            files = source_files(task.op, task.source)
            fp = known["fingerprint"] = fingerprint(files).hex()
            sha = known["source_sha256"] = checksum(files)
            if task.expect is not None and task.output is not None:
                want_sha, want_bytes = task.expect
                if sha[: len(want_sha)] == want_sha and output_size(task.output) == want_bytes:
                    return _record(task, "unchanged", source_sha256=sha, fingerprint=fp,
                                   output_sha256=_output_checksum(task.output), bytes=want_bytes,
                                   seconds=time.perf_counter() - t0)
            _do(task)
            if task.output is not None:
                nbytes, out_sha = output_size(task.output), _output_checksum(task.output)
            else:
                nbytes, out_sha = os.path.getsize(task.source), None
            status, kw = "ok", {"source_sha256": sha, "fingerprint": fp, "output_sha256": out_sha, "bytes": nbytes}
        except _REPORTED as exc:
            status, kw = "failed", {**known, "error": one_line(_error_text(exc))}
        except Exception as exc:  # a bug in deltacodec: recorded, and the batch goes on
            status, kw = "failed", {**known, "error": one_line(f"internal error (a bug in deltacodec, please report "
                                                               f"it): {type(exc).__name__}: {exc}"), "bug": True}
        finally:
            caught = [one_line(str(w.message))[:2000] for w in seen if issubclass(w.category, DeltacodecWarning)]
    return _record(task, status, seconds=time.perf_counter() - t0, warnings=caught[:_MAX_WARNINGS], **kw)
