"""The batch manifest: a JSON-lines log in DST, one record per result, appended and fsynced.

A record (one line of strict JSON) says what happened to one item::

    {"op": "encode", "source": "team/a", "output": "team/a.sld", "status": "ok",
     "source_sha256": "...", "fingerprint": "...", "options": {...}, "options_id": "...",
     "output_sha256": "...", "bytes": 1234, "seconds": 0.02, "error": null, "warnings": [],
     "deltacodec": "0.1.0"}

``status`` is ``ok``, ``failed``, ``unchanged`` (the source was touched but its bytes and the
options are the same: nothing was redone) or ``started`` (written before an item is handed to a
worker: the output that a killed run may have finished belongs to the batch, so the rerun may
replace it). The last record of an item wins.

Durability: a result line is fsynced before the next item is counted as done, so a killed run
(even SIGKILL) loses at most the items in flight. A line cut short by a kill is ignored when
the manifest is read again, and the next append starts on a new line. The manifest is the one
file the batch appends to rather than replaces: an append-only log with an fsync per record is
what makes a finished item survive a kill; its path is checked by :mod:`deltacodec.outputs`
(never an input, never inside one).

Skipping needs only a compact index, :class:`Index`: per item an 8-byte key (a hash of its
output path) and 33 bytes of state: 144 bytes of Python memory per item, 137 MiB per million
adapters (``benchmarks/bench_batch.py --index-items 1000000`` measures it).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
from dataclasses import dataclass
from typing import Any

from ..errors import DeltacodecWarning
from ..outputs import check_output

__all__ = ["Manifest", "Index", "State", "manifest_path", "digest8", "item_key", "MAX_RECORD_BYTES"]

MANIFEST_NAME = "sld-batch-{op}.jsonl"
#: A longer line is not a record this module wrote: it is ignored (the item is redone).
MAX_RECORD_BYTES = 1 << 20
STATUSES = ("started", "ok", "failed", "unchanged")

# Index state: flags, fingerprint, options id, source checksum prefix (8 bytes each), output bytes.
_STATE = struct.Struct("<B8s8s8sQ")
_DONE = 1  # the last result was ok/unchanged
_OWNED = 2  # an output at this path was (or may have been) written by this batch


def manifest_path(dst: str, op: str) -> str:
    return os.path.join(dst, MANIFEST_NAME.format(op=op))


def digest8(*parts: str | bytes) -> bytes:
    """An 8-byte BLAKE2b digest of ``parts`` (each length-prefixed: no two lists collide by
    concatenation)."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        b = p.encode("utf-8", "surrogatepass") if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.digest()


def item_key(op: str | None, source: str, output: str | None) -> str:
    """What the index keys an item by: its output path (two inputs that would write the same
    output are the same key); for verify, which writes nothing, its source path. A record of
    encode/decode without an output (an input refused before it had one) gets a key of its own
    that no item claims, so it cannot shadow an output's state."""
    if output is not None:
        return output
    return source if op == "verify" else "\0" + source


def _key(out_rel: str) -> int:
    return int.from_bytes(digest8(out_rel), "little")


@dataclass(frozen=True)
class State:
    """What the manifest says about one item: ``done`` (its last result was ok or unchanged),
    ``owned`` (this batch wrote or may have written its output), ``fingerprint``, ``options_id``,
    ``source_id`` (8 bytes each: a stat fingerprint of the source files, a hash of the op,
    item and options, the first 8 bytes of the source's SHA-256), ``out_bytes`` (output size)."""

    done: bool
    owned: bool
    fingerprint: bytes
    options_id: bytes
    source_id: bytes
    out_bytes: int


_ZERO8 = bytes(8)


class Index:
    """Output path -> packed state of its last record; and, during a run, which outputs this run
    has claimed (so that two inputs writing the same output are caught)."""

    def __init__(self) -> None:
        self._d: dict[int, bytes | None] = {}

    def __len__(self) -> int:
        return len(self._d)

    def update(self, rec: dict[str, Any]) -> None:
        """Fold one manifest record in (the last record of an item wins; ownership sticks)."""
        k = _key(item_key(rec.get("op"), rec["source"], rec.get("output")))
        old = self._d.get(k)
        owned = bool(old and old[0] & _OWNED)
        status = rec["status"]
        if status == "started" or (status in ("ok", "unchanged") and rec.get("output") is not None):
            owned = True
        if status == "started":
            # Handed to a worker, result unknown: the output may have been written, so it is ours;
            # the item is not done.
            self._d[k] = _STATE.pack(_OWNED, _ZERO8, _ZERO8, _ZERO8, 0)
            return
        done = status in ("ok", "unchanged")
        try:
            fp = bytes.fromhex(rec.get("fingerprint") or "")[:8].ljust(8, b"\0")
            oid = bytes.fromhex(rec.get("options_id") or "")[:8].ljust(8, b"\0")
            sid = bytes.fromhex((rec.get("source_sha256") or "")[:16]).ljust(8, b"\0")
        except ValueError:
            done, fp, oid, sid = False, _ZERO8, _ZERO8, _ZERO8
        nbytes = rec.get("bytes") if isinstance(rec.get("bytes"), int) and rec["bytes"] >= 0 else 0
        self._d[k] = _STATE.pack((_DONE if done else 0) | (_OWNED if owned else 0), fp, oid, sid, min(nbytes, 2**64 - 1))

    def claim(self, key: str) -> State | None | bool:
        """Claim an item's :func:`item_key` for this run: its recorded :class:`State`, None when it
        has no record, or False when another item of this run claimed it already."""
        k = _key(key)
        v = self._d.get(k, b"")
        if v is None:
            return False
        self._d[k] = None
        if not v:
            return None
        flags, fp, oid, sid, n = _STATE.unpack(v)
        return State(bool(flags & _DONE), bool(flags & _OWNED), fp, oid, sid, n)


class Manifest:
    """The manifest of one op in DST: :meth:`read_index` once, then :meth:`append` per record."""

    def __init__(self, dst: str, op: str, *, inputs: tuple[str, ...] = ()) -> None:
        self.path = manifest_path(dst, op)
        # An existing manifest is appended to (force: it is ours); it must never be an input.
        check_output(self.path, list(inputs), force=True, kind="file")
        self._fd: int | None = None
        self.ignored = 0

    def read_index(self) -> Index:
        """Stream the manifest into an :class:`Index`. Unreadable lines (a line cut short by a
        killed run, anything not a record) are counted in ``ignored`` and warned about once:
        their items are simply redone."""
        idx = Index()
        try:
            fh = open(self.path, "rb")
        except FileNotFoundError:
            return idx
        except OSError as exc:
            raise OSError(exc.errno, f"cannot read the batch manifest: {exc.strerror}", self.path) from None
        with fh:
            while True:
                line = fh.readline(MAX_RECORD_BYTES + 1)
                if not line:
                    break
                rec = _parse(line)
                if rec is None:
                    if len(line) > MAX_RECORD_BYTES:  # skip the rest of an overlong line
                        while line and not line.endswith(b"\n"):
                            line = fh.readline(MAX_RECORD_BYTES)
                    self.ignored += 1
                    continue
                idx.update(rec)
        if self.ignored:
            warnings.warn(
                f"{self.path}: {self.ignored} unreadable line{'s' if self.ignored != 1 else ''} ignored (a run "
                "killed while writing; their items are redone)",
                DeltacodecWarning,
                stacklevel=2,
            )
        return idx

    def _open(self) -> int:
        if self._fd is None:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            created = not os.path.exists(self.path)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666)
            try:
                size = os.fstat(fd).st_size
                if size:
                    with open(self.path, "rb") as fh:  # a line cut short by a kill: end it
                        fh.seek(size - 1)
                        if fh.read(1) != b"\n":
                            os.write(fd, b"\n")
            except BaseException:
                os.close(fd)
                raise
            if created:
                _fsync_dir(os.path.dirname(os.path.abspath(self.path)))  # the new name is durable too
            self._fd = fd
        return self._fd

    def append(self, rec: dict[str, Any], *, sync: bool = True) -> None:
        """Append one record as one line (a single write); ``sync``: fsync before returning."""
        data = (json.dumps(rec, ensure_ascii=True, allow_nan=False, separators=(",", ":")) + "\n").encode("ascii")
        fd = self._open()
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        if sync:
            os.fsync(fd)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform opens a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _parse(line: bytes) -> dict[str, Any] | None:
    """A record from one line, or None when the line is not a complete record."""
    if len(line) > MAX_RECORD_BYTES or not line.endswith(b"\n"):
        return None
    try:
        rec = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(rec, dict) or rec.get("status") not in STATUSES or not isinstance(rec.get("source"), str):
        return None
    if rec.get("output") is not None and not isinstance(rec["output"], str):
        return None
    return rec
