"""Writing outputs so that no input and no output is ever lost: the one place outputs are written.

* :func:`check_output` refuses an output path that exists (unless ``force``) and, even with
  ``force``, one that is, lies inside, or contains an input of the command, however either path
  is spelled (symlinks, ``..``, trailing slashes, relative or absolute, hard links).
* :func:`atomic_file` writes one file: a temporary beside OUT, fsynced, then renamed onto OUT.
* :func:`staged_directory` builds a directory in a staging directory beside OUT and swaps it in
  whole: OUT is always either the old whole or the new whole.
* Temporaries are named ``.sld-tmp-<pid>-<host>-<random>`` (``<host>`` is 8 hex digits of a hash
  of the host name). Every write first removes, from the directory it writes into, the
  temporaries of this host and user whose process is gone, and warns naming each one.

Errors are :class:`OutputError` naming the user's path, never a temporary's; whatever fails
(a full disk, a permission, an interrupt), no temporary is left behind by a live process.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import stat
import sys
import warnings
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator, Sequence

from .errors import DeltacodecWarning, OutputError

__all__ = [
    "TEMP_PREFIX",
    "OutputTarget",
    "Stage",
    "check_output",
    "atomic_file",
    "write_bytes",
    "staged_directory",
    "clean_leftovers",
    "within",
]

TEMP_PREFIX = ".sld-tmp-"
_TEMP_RE = re.compile(r"^\.sld-tmp-(?P<pid>[0-9]{1,10})-(?P<host>[0-9a-f]{8})-[0-9a-f]{8}(?P<old>\.old)?$")
# Names the temporaries of deltacodec 0.1.0 had (tempfile.mkstemp / mkdtemp): they carry no owner,
# so they are reported, never removed.
_LEGACY_RE = re.compile(r"^\.sld-(?:apply-[a-z0-9_]{8}|[a-z0-9_]{8}\.tmp)$")


def _host_tag() -> str:
    name = socket.gethostname().encode("utf-8", "surrogateescape")
    return hashlib.sha256(name).hexdigest()[:8]


# ----------------------------------------------------------------------------------------------
# Which path an output is, and whether it may be written


@dataclass(frozen=True)
class OutputTarget:
    """A checked output: ``path`` as the user gave it (for messages), ``entry`` the absolute
    directory entry a rename replaces, ``parent`` its directory, ``exists`` whether it exists."""

    path: str
    entry: str
    parent: str
    exists: bool
    is_dir: bool


def _absolute(p: str) -> str:
    return p if os.path.isabs(p) else os.path.join(os.getcwd(), p)


def _entry_of(p: str) -> str:
    """The absolute directory entry that renaming onto ``p`` replaces: the parent resolved (so a
    ``..`` after a symlink goes where the kernel goes), the last component kept as it is (a
    symlink there is the entry itself, not its target)."""
    full = _absolute(p)
    stripped = full.rstrip("/" + (os.sep if os.sep != "/" else "")) or full
    head, tail = os.path.split(stripped)
    if tail in ("", ".", ".."):
        return os.path.realpath(stripped)
    return os.path.join(os.path.realpath(head), tail)


def within(child: str, parent: str) -> bool:
    """``child`` is ``parent`` or lies below it (both absolute and normalised)."""
    if child == parent:
        return True
    return child.startswith(parent if parent.endswith(os.sep) else parent + os.sep)


def _ancestors(p: str) -> Iterator[str]:
    """``p`` and every directory above it, up to the root."""
    while True:
        yield p
        up = os.path.dirname(p)
        if up == p:
            return
        p = up


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _overlap(out: str, targets: Sequence[str], inp: str) -> str | None:
    """How writing ``targets`` (OUT's entry and its resolved path) would touch the input ``inp``,
    or None. Checked on resolved paths and on inodes (hard links, bind mounts, case-insensitive
    file systems), for both directions: OUT in or at the input, and the input inside OUT."""
    real = os.path.realpath(_absolute(inp))
    for t in targets:
        if t == real or (os.path.lexists(t) and _same(t, inp)):
            return f"{out}: is the input {inp}; refusing to write over an input (even with --force)"
    for t in targets:
        if within(t, real) or any(_same(a, inp) for a in _ancestors(os.path.dirname(t))):
            return f"{out}: lies inside the input {inp}; refusing to write into an input (even with --force)"
    for t in targets:
        if within(real, t) or (os.path.exists(t) and any(_same(a, t) for a in _ancestors(real))):
            return (
                f"{out}: contains the input {inp}; replacing it would delete that input "
                "(refused even with --force)"
            )
    return None


def check_output(
    out: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str]] = (),
    *,
    force: bool = False,
    kind: str = "file",
) -> OutputTarget:
    """Check that ``out`` may be written by a command reading ``inputs``; raise OutputError if not.

    ``kind`` is ``"file"`` or ``"dir"``: what will be written. An existing OUT is refused unless
    ``force`` (an existing empty directory may take a directory output: nothing in it is lost);
    an OUT of the other kind is refused even with ``force`` (``-o models/`` for a file would
    delete a directory). OUT equal to, inside, or containing an input is always refused.
    """
    path = os.fspath(out)
    if not path:
        raise OutputError("output path is empty")
    entry = _entry_of(path)
    targets = [entry]
    resolved = os.path.realpath(_absolute(path))
    if resolved != entry:
        targets.append(resolved)
    for inp in inputs:
        why = _overlap(path, targets, os.fspath(inp))
        if why:
            raise OutputError(why)
    if kind == "file" and path.endswith(("/", os.sep)):
        raise OutputError(f"{path}: ends with '/', which names a directory; expected a file path")
    exists = os.path.lexists(entry)
    is_dir = os.path.isdir(entry)
    if exists:
        if kind == "file" and is_dir:
            raise OutputError(
                f"{path}: is a directory; expected a file path (--force does not replace a directory with a file)"
            )
        if kind == "dir" and not is_dir:
            raise OutputError(
                f"{path}: exists and is not a directory (--force does not replace a file with a directory)"
            )
        empty_dir = kind == "dir" and not os.path.islink(entry) and not _listdir(entry)
        if not force and not empty_dir:
            raise OutputError(f"{path}: already exists (use --force to replace it)")
    return OutputTarget(path, entry, os.path.dirname(entry), exists, is_dir)


def _listdir(p: str) -> list[str]:
    try:
        return os.listdir(p)
    except OSError:
        return ["?"]  # unreadable: treat as not empty


# ----------------------------------------------------------------------------------------------
# Temporaries and leftovers


def _temp_name(parent: str, suffix: str = "") -> str:
    return os.path.join(parent, f"{TEMP_PREFIX}{os.getpid()}-{_host_tag()}-{secrets.token_hex(4)}{suffix}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if pid <= 0:
        return True  # not a process id we could have written: keep it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: alive, owned by another user; anything else: keep it
    return True


def _remove(p: str) -> None:
    """Remove a file, link or directory tree; never follows a symlink."""
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(p)
    else:
        os.unlink(p)


def clean_leftovers(parent: str | os.PathLike[str]) -> list[str]:
    """Remove the temporaries in ``parent`` left by killed runs; return the paths removed.

    Removed: names made by :func:`_temp_name` on this host, owned by this user, whose process
    is gone. Reported but kept (one :class:`DeltacodecWarning`): a ``.old`` temporary (the
    previous OUT, moved aside by a run killed while swapping it) and the owner-less temporaries
    of deltacodec 0.1.0. A live run's temporaries are never touched.
    """
    parent = os.fspath(parent)
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    host = _host_tag()
    uid = os.getuid() if hasattr(os, "getuid") else None
    removed, kept = [], []
    for name in sorted(names):
        p = os.path.join(parent, name)
        m = _TEMP_RE.match(name)
        if m is None:
            if _LEGACY_RE.match(name):
                kept.append(f"{p} (from an older deltacodec; remove it if no sld is running)")
            continue
        if m["host"] != host or _pid_alive(int(m["pid"])):
            continue
        try:
            if uid is not None and os.lstat(p).st_uid != uid:
                continue
        except OSError:
            continue
        if m["old"]:
            kept.append(f"{p} (the previous contents of an output replaced with --force by a run that was killed)")
            continue
        try:
            _remove(p)
        except OSError as exc:
            kept.append(f"{p} (could not be removed: {exc.strerror or exc})")
            continue
        removed.append(p)
    if removed:
        warnings.warn(
            f"removed {len(removed)} leftover temporar{'y' if len(removed) == 1 else 'ies'} of "
            f"interrupted sld runs: {', '.join(removed)}",
            DeltacodecWarning,
            stacklevel=3,
        )
    if kept:
        warnings.warn(f"leftover temporaries kept: {'; '.join(kept)}", DeltacodecWarning, stacklevel=3)
    return removed


# ----------------------------------------------------------------------------------------------
# Renames


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_RENAMEAT2 = None  # ctypes function, False when unavailable; tests set False to take the fallback


def _renameat2(src: str, dst: str, flags: int) -> bool:
    """Linux renameat2; False when the kernel, libc or file system does not support ``flags``."""
    global _RENAMEAT2
    if _RENAMEAT2 is None:
        _RENAMEAT2 = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                libc = ctypes.CDLL(None, use_errno=True)
                fn = libc.renameat2
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _RENAMEAT2 = fn
            except (OSError, AttributeError):
                pass
    if not _RENAMEAT2:
        return False
    import ctypes

    if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), src, None, dst)


def _fsync_dir(p: str) -> None:
    # Makes the rename itself durable; not every platform or file system can open a directory.
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _place(tmp: str, t: OutputTarget, *, is_dir: bool) -> None:
    """Move the finished temporary ``tmp`` onto ``t.entry``; the old OUT, if any, goes whole."""
    if not t.exists:
        appeared = OutputError(f"{t.path}: appeared while this run was writing it; not replaced")
        try:
            done = _renameat2(tmp, t.entry, _RENAME_NOREPLACE)
        except FileExistsError:
            raise appeared from None
        if not done:
            if os.path.lexists(t.entry):
                raise appeared
            os.rename(tmp, t.entry)
    elif _renameat2(tmp, t.entry, _RENAME_EXCHANGE):
        _remove(tmp)  # tmp now holds the old OUT
    elif not is_dir and not os.path.isdir(t.entry):
        os.replace(tmp, t.entry)  # atomic for a file
    else:
        # No atomic exchange here: move the old aside, rename the new in, delete the old. A run
        # killed in between leaves the old OUT whole under a .old name that clean_leftovers reports.
        aside = _temp_name(t.parent, ".old")
        os.rename(t.entry, aside)
        try:
            os.rename(tmp, t.entry)
        except BaseException:
            os.rename(aside, t.entry)
            raise
        _remove(aside)
    _fsync_dir(t.parent)


def _prepare_parent(t: OutputTarget) -> None:
    try:
        os.makedirs(t.parent, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{t.path}: cannot create its directory: {exc.strerror or exc}") from None
    clean_leftovers(t.parent)


def _as_output_error(exc: BaseException, t: OutputTarget, temps: Sequence[str]) -> BaseException:
    """An OSError from writing our temporaries, as an OutputError naming the user's path; any
    other exception as it is (a reading error names its own file)."""
    if isinstance(exc, OSError) and not isinstance(exc, OutputError):
        names = {exc.filename, getattr(exc, "filename2", None)} - {None}
        ours = all(
            isinstance(n, (str, bytes)) and any(within(os.fsdecode(n), tp) for tp in (*temps, t.entry))
            for n in names
        )
        if ours:
            what = exc.strerror or str(exc)
            return OutputError(f"{t.path}: cannot write: {what}; nothing was written")
    return exc


# ----------------------------------------------------------------------------------------------
# Single files


@contextlib.contextmanager
def atomic_file(
    out: str | os.PathLike[str],
    *,
    inputs: Iterable[str | os.PathLike[str]] = (),
    force: bool = False,
) -> Iterator[BinaryIO]:
    """Open a temporary beside ``out`` for writing; on leaving the block it is fsynced and renamed
    onto ``out``. An exception in the block (or while finishing) removes the temporary and
    leaves ``out`` as it was. The file gets the permissions a plain ``open()`` would give it.
    """
    t = check_output(out, list(inputs), force=force, kind="file")
    _prepare_parent(t)
    tmp = _temp_name(t.parent)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as exc:
        raise OutputError(f"{t.path}: cannot write in {t.parent}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        _place(tmp, t, is_dir=False)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            _remove(tmp)
        err = _as_output_error(exc, t, [tmp])
        if err is exc:
            raise
        raise err from None


def write_bytes(
    out: str | os.PathLike[str],
    data: bytes | Iterable[bytes],
    *,
    inputs: Iterable[str | os.PathLike[str]] = (),
    force: bool = False,
) -> str:
    """Write ``data`` (bytes or an iterable of chunks) to ``out`` atomically; return ``out``."""
    with atomic_file(out, inputs=inputs, force=force) as fh:
        if isinstance(data, (bytes, bytearray, memoryview)):
            fh.write(data)
        else:
            for chunk in data:
                fh.write(chunk)
    return os.fspath(out)


# ----------------------------------------------------------------------------------------------
# Directories


class Stage:
    """A staging directory being built; files opened here are fsynced when closed.

    ``path`` is the staging directory; ``rel`` arguments are paths relative to it (the final
    OUT has the same layout).
    """

    def __init__(self, path: str, target: OutputTarget) -> None:
        self.path = path
        self.target = target

    def _abs(self, rel: str) -> str:
        p = os.path.normpath(os.path.join(self.path, rel))
        if not within(p, self.path) or p == self.path:
            raise OutputError(f"{self.target.path}: '{rel}' is not a path inside the output")
        return p

    def makedirs(self, rel: str) -> str:
        p = self._abs(rel)
        os.makedirs(p, exist_ok=True)  # mode 0o777 less the umask, as mkdir gives
        return p

    @contextlib.contextmanager
    def open(self, rel: str) -> Iterator[BinaryIO]:
        """A new file at ``rel`` for binary writing, fsynced on leaving the block."""
        p = self._abs(rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())

    def copy(self, src: str, rel: str) -> str:
        """Copy the content of ``src`` (a symlink is followed) to ``rel``, with its mode bits."""
        p = self._abs(rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        shutil.copyfile(src, p)  # the kernel's copy (sendfile) where there is one: shards are GBs
        shutil.copymode(src, p)
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return p

    def symlink(self, target: str, rel: str) -> str:
        p = self._abs(rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        os.symlink(target, p)
        return p


@contextlib.contextmanager
def staged_directory(
    out: str | os.PathLike[str],
    *,
    inputs: Iterable[str | os.PathLike[str]] = (),
    force: bool = False,
) -> Iterator[Stage]:
    """Build a directory output in a staging directory beside ``out``, then swap it in whole.

    With ``force`` and an existing OUT, the swap is one atomic exchange where the file system
    has one (Linux renameat2); elsewhere the old OUT is moved aside, the new renamed in and the
    old deleted. An exception in the block removes the staging directory and leaves ``out``
    as it was. The directory gets the permissions a plain ``mkdir`` would give it.
    """
    t = check_output(out, list(inputs), force=force, kind="dir")
    _prepare_parent(t)
    tmp = _temp_name(t.parent)
    try:
        os.mkdir(tmp, 0o777)
    except OSError as exc:
        raise OutputError(f"{t.path}: cannot write in {t.parent}: {exc.strerror or exc}") from None
    try:
        yield Stage(tmp, t)
        _fsync_dir(tmp)
        _place(tmp, t, is_dir=True)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            _remove(tmp)
        err = _as_output_error(exc, t, [tmp])
        if err is exc:
            raise
        raise err from None
