"""Finding the items of a batch: a directory tree, a glob, or a file listing paths, streamed.

Nothing here holds the whole listing: a tree is walked depth-first with one open directory
iterator per level (a directory of a million adapters is never read into a list), a glob is
``glob.iglob``, a listing file is read a line at a time. Items come out in the order the file
system gives them; every item carries its path relative to a root, which the batch mirrors
under DST.

What counts as an item is decided by layout, generously, and the reader has the last word:

* ``adapters`` (``sld batch encode``): a directory holding one of :data:`WEIGHT_FILES` is one
  adapter (it is not searched further: its other files belong to it); a directory with an
  ``adapter_config.json`` but no weights and no ``.safetensors`` file is one too (the reader
  reports what is missing). Elsewhere every ``.safetensors`` file is a standalone adapter (with
  the ``adapter_config.json`` beside it, if any). Whatever the reader then refuses (a model
  shard, a damaged file) becomes a failed item with the reader's error, and the batch goes on.
* ``sld`` (``sld batch decode``/``verify``): every ``.sld`` file.

A glob's matches are taken as they are (a matched adapter directory or file is an item; other
directories are not searched, since ``**`` matches every directory below on its own); a
listing's entries are searched as trees when they are directories and taken whatever their
name when they are files (the reader says what is wrong with them).

Names starting with ``.`` are skipped (temporaries, ``.git``); symlinked directories are not
followed (no loops), symlinked files are. A directory that cannot be read, a listing entry that
does not exist or lies outside the root, become failed items too (:attr:`Item.problem`).
"""

from __future__ import annotations

import glob
import os
import stat
from dataclasses import dataclass
from typing import Iterator

from ..errors import SldError
from ..outputs import within

__all__ = ["Item", "Source", "open_source", "WEIGHT_FILES", "KINDS"]

#: Weight files that make a directory an adapter: PEFT's names and the diffusers pipeline LoRA
#: names. The reader (deltacodec.read_adapter) decides whether it can read what is there.
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "pytorch_lora_weights.safetensors",
                "pytorch_lora_weights.bin")
CONFIG_FILE = "adapter_config.json"
KINDS = ("adapters", "sld")
#: Deeper trees are reported, not walked: one open directory per level.
MAX_DEPTH = 64
_GLOB_MAGIC = set("*?[")


@dataclass(frozen=True)
class Item:
    """One input of a batch. ``rel``: its path under the root, '/'-separated (what DST mirrors);
    ``path``: where it is read from; ``problem``: why it cannot be processed (it is then
    recorded as failed), or None."""

    rel: str
    path: str
    problem: str | None = None


@dataclass(frozen=True)
class Source:
    """A parsed SRC: ``kind`` is "tree", "glob" or "list"; ``spec`` what the user gave;
    ``root`` the directory item paths are relative to; ``inputs`` the paths outputs must never
    touch (the tree; the listing file); ``what``: "adapters" or "sld"."""

    kind: str
    spec: str
    root: str
    inputs: tuple[str, ...]
    what: str
    exclude: str | None = None  # a real path whose subtree is skipped (DST)

    def items(self) -> Iterator[Item]:
        """The items, streamed."""
        if self.kind == "tree":
            yield from _walk(self, self.spec, _root_rel(self.spec), 0)
        elif self.kind == "glob":
            yield from _glob_items(self)
        else:
            yield from _list_items(self)


def _root_rel(path: str) -> str:
    """The rel of a tree root that is itself an item: its own name."""
    return os.path.basename(os.path.normpath(os.path.abspath(path))) or "."


def open_source(spec: str, what: str, *, root: str | None = None, exclude: str | None = None) -> Source:
    """Classify SRC. An existing directory is a tree; an existing file is a listing of paths,
    one per line (blank lines and lines starting with '#' ignored; relative paths are relative to
    the listing's directory); a path that does not exist but has glob characters is a glob
    (``**`` recurses). ``root`` (listing and glob only): the directory that items are mirrored
    relative to (default: the listing's directory, or the glob's leading directory without wildcards).
    ``exclude``: DST, whose subtree is never listed. Raises SldError for an unusable SRC.
    """
    if what not in KINDS:
        raise SldError(f"unknown item kind '{what}', expected one of {', '.join(KINDS)}")
    if not spec:
        raise SldError("SRC is empty")
    ex = os.path.realpath(exclude) if exclude is not None else None
    if os.path.isdir(spec):
        if root is not None:
            raise SldError(f"{spec}: --root applies to a glob or a listing file, not to a directory SRC")
        return Source("tree", spec, spec, (spec,), what, ex)
    if os.path.isfile(spec):
        single = (".safetensors", ".bin") if what == "adapters" else (".sld",)
        if spec.endswith(single):
            raise SldError(
                f"{spec}: is a single {'adapter' if what == 'adapters' else '.sld file'}; SRC of a batch is a "
                "directory, a glob or a file listing paths (one per line)"
            )
        base = root if root is not None else (os.path.dirname(spec) or ".")
        return Source("list", spec, base, (spec,), what, ex)
    if os.path.lexists(spec):
        raise SldError(f"{spec}: not a directory, a regular file or a glob")
    if not _GLOB_MAGIC & set(spec):
        raise SldError(f"{spec}: no such file or directory")
    base = root if root is not None else _glob_prefix(spec)
    return Source("glob", spec, base, (), what, ex)


def _glob_prefix(pattern: str) -> str:
    """The leading directories of ``pattern`` that hold no wildcard ('.' when there are none)."""
    parts = pattern.split(os.sep)
    fixed = []
    for p in parts[:-1]:
        if _GLOB_MAGIC & set(p):
            break
        fixed.append(p)
    if not fixed:
        return "."
    return os.sep.join(fixed) or os.sep


# ----------------------------------------------------------------------------------------------
# Trees


def _is_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _item_dir(path: str, what: str) -> bool:
    """``path`` is one adapter directory (checked with a few stats, before listing it)."""
    if what != "adapters":
        return False
    if any(_is_file(os.path.join(path, n)) for n in WEIGHT_FILES):
        return True
    if not _is_file(os.path.join(path, CONFIG_FILE)):
        return False
    # A config with standalone .safetensors files beside it: those are the adapters (each reads
    # the config); a config alone is a directory adapter whose weights are missing.
    try:
        with os.scandir(path) as it:
            return not any(e.name.endswith(".safetensors") and e.is_file() for e in it)
    except OSError:
        return True


def _item_file(name: str, what: str) -> bool:
    return name.endswith(".safetensors") if what == "adapters" else name.endswith(".sld")


def _excluded(src: Source, path: str) -> bool:
    return src.exclude is not None and within(os.path.realpath(path), src.exclude)


def _walk(src: Source, path: str, rel: str, depth: int) -> Iterator[Item]:
    if _excluded(src, path):
        return
    if _item_dir(path, src.what):
        yield Item(rel, path)
        return
    if depth > MAX_DEPTH:
        yield Item(rel, path, f"{path}: more than {MAX_DEPTH} directory levels deep; not searched")
        return
    try:
        it = os.scandir(path)
    except OSError as exc:
        yield Item(rel, path, f"{path}: cannot list the directory: {exc.strerror or exc}")
        return
    top = depth == 0
    with it:
        while True:
            try:
                e = next(it)
            except StopIteration:
                break
            except OSError as exc:
                yield Item(rel, path, f"{path}: cannot list the directory: {exc.strerror or exc}")
                break
            if e.name.startswith("."):
                continue
            child_rel = e.name if top else f"{rel}/{e.name}"
            try:
                is_dir = e.is_dir(follow_symlinks=False)
                is_file = not is_dir and e.is_file()
            except OSError:
                continue
            if is_dir:
                yield from _walk(src, e.path, child_rel, depth + 1)
            elif is_file and _item_file(e.name, src.what) and not _excluded(src, e.path):
                yield Item(child_rel, e.path)


def _rel_under(path: str, root: str) -> str | None:
    """``path`` relative to ``root``, '/'-separated, or None when it is not below root."""
    a, r = os.path.abspath(path), os.path.abspath(root)
    if not within(a, r) or a == r:
        return None
    return os.path.relpath(a, r).replace(os.sep, "/")


def _entry_items(src: Source, path: str, named: bool) -> Iterator[Item]:
    """A glob match or listing entry: a directory is searched (it may be an adapter itself), a
    file is taken when its name fits (``named``: a listing entry is taken whatever its name)."""
    rel = _rel_under(path, src.root)
    if rel is None:
        yield Item(os.path.basename(path) or path, path,
                   f"{path}: lies outside {src.root}, which DST mirrors (set --root to a directory above it)")
        return
    if _excluded(src, path):
        if named:
            yield Item(rel, path, f"{path}: lies inside DST")
        return
    if os.path.isdir(path):
        if named:
            yield from _walk(src, path, rel, 1)
        else:
            yield Item(rel, path)
    elif os.path.isfile(path):
        if named or _item_file(os.path.basename(path), src.what):
            yield Item(rel, path)
    elif named:
        yield Item(rel, path, f"{path}: no such file or directory")


def _glob_items(src: Source) -> Iterator[Item]:
    """A matched directory is an item when it is an adapter directory (it is not searched: with
    ``**`` every directory below matches on its own); a matched file is one when its name fits and
    its directory is not an adapter directory (the file then belongs to that adapter)."""
    for match in glob.iglob(src.spec, recursive=True):
        if os.path.isdir(match):
            if not _item_dir(match, src.what):
                continue
        elif _item_dir(os.path.dirname(match) or ".", src.what):
            continue
        yield from _entry_items(src, match, named=False)


#: A listing line longer than this is refused (the listing is read a line at a time).
MAX_LINE = 1 << 16


def _list_items(src: Source) -> Iterator[Item]:
    base = os.path.dirname(src.spec) or "."
    try:
        fh = open(src.spec, "rb")
    except OSError as exc:
        raise SldError(f"{src.spec}: cannot read the listing: {exc.strerror or exc}") from None
    with fh:
        lineno = 0
        while True:
            raw = fh.readline(MAX_LINE + 1)
            if not raw:
                break
            lineno += 1
            if len(raw) > MAX_LINE:
                raise SldError(f"{src.spec}: line {lineno} is longer than {MAX_LINE} bytes; expected one path per line")
            if b"\0" in raw:
                raise SldError(f"{src.spec}: line {lineno} holds a NUL byte; expected a text file of paths")
            text = os.fsdecode(raw.rstrip(b"\r\n")).strip()
            if not text or text.startswith("#"):
                continue
            yield from _entry_items(src, os.path.join(base, text), named=True)
