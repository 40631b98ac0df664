"""``sld apply BASE file.sld -o OUT``: patch a checkpoint on disk, one tensor at a time.

BASE is a model directory of safetensors shards or one ``.safetensors`` file. The shards are
the files listed in ``model.safetensors.index.json`` when there is one, else every top-level
``*.safetensors``. OUT receives the shards patched (same names, dtypes, shapes, metadata and
tensor order; the index is copied as it is) and a copy of everything else in BASE: every other
file and every subdirectory, at the same relative path.

Before anything is written, the index and every shard header are validated (bounded reads: a
truncated, empty or non-safetensors shard, an index that is not JSON or not of the documented
shape, a shard path that is absolute or leaves BASE, a listed shard that is missing: each an
:class:`ApplyError` naming the shard or index and what was expected), and every name, shape and
dtype the adapter needs is checked. Two adapter entries resolving to the same checkpoint tensor,
or one tensor present in two shards, are refused. OUT is built in a staging directory beside
it and renamed into place whole (:mod:`deltacodec.outputs`): a failure leaves no partial OUT,
an existing OUT is replaced only with ``force``, and OUT is never BASE, inside BASE, or a
directory containing BASE or any file read.

Symbolic links inside BASE:

* to a regular file, wherever it points, the content is copied (with the target's mode bits):
  a Hugging Face cache snapshot is made of such links into ``../../blobs``;
* to a directory inside BASE: recreated in OUT as a relative link to the same place in OUT;
* to a directory outside BASE, dangling, or to something that is neither file nor directory:
  refused (ApplyError). Copying a tree from outside BASE is not "a copy of BASE", and
  following directory links could loop.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from .errors import ApplyError, preview
from .format import SldFile, TensorEntry
from .outputs import atomic_file, check_output, staged_directory, within
from .safetensors_io import StEntry, StHeader, TensorSpec, read_header, write_safetensors

__all__ = ["apply_checkpoint", "add_apply_parser", "INDEX_NAME"]

INDEX_NAME = "model.safetensors.index.json"
_MAX_INDEX_BYTES = 64 << 20  # real indexes are well under a megabyte
_READ_CHUNK = 16 << 20
_WEIGHT_DTYPES = ("F32", "F16", "BF16")
_EXTRA_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass
class _Layout:
    """What BASE holds, as paths relative to it: shards to patch, files to copy, directories
    to create, directory links to recreate, and every path that will be read."""

    base: str
    single: bool
    shards: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # rel -> path to read (links followed)
    dirs: list[str] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)  # (link text, rel)
    inputs: list[str] = field(default_factory=list)

    def src(self, rel: str) -> str:
        return self.files[rel]


def _walk(base: str) -> _Layout:
    """Every entry under the directory BASE (see the module doc for symbolic links)."""
    lay = _Layout(base, single=False)
    root = os.path.realpath(base)

    def visit(dir_path: str, prefix: str) -> None:
        try:
            entries = sorted(os.scandir(dir_path), key=lambda e: e.name)
        except OSError as exc:
            raise ApplyError(f"{dir_path}: cannot list the directory: {exc.strerror or exc}") from None
        for entry in entries:
            rel = f"{prefix}{entry.name}"
            try:
                if entry.is_symlink():
                    try:
                        st = os.stat(entry.path)
                    except OSError:
                        raise ApplyError(
                            f"{base}: '{rel}' is a broken symbolic link (its target is missing, or links loop)"
                        ) from None
                    target = os.path.realpath(entry.path)
                    if stat.S_ISREG(st.st_mode):
                        lay.files[rel] = entry.path
                        lay.inputs.append(target)
                    elif stat.S_ISDIR(st.st_mode):
                        if not within(target, root):
                            raise ApplyError(
                                f"{base}: '{rel}' is a symbolic link to the directory {target}, outside BASE; "
                                "refusing to copy a tree from outside BASE"
                            )
                        text = os.path.relpath(os.path.relpath(target, root), os.path.dirname(rel) or ".")
                        lay.links.append((text, rel))
                    else:
                        raise ApplyError(f"{base}: '{rel}' is a symbolic link to something that is not a file or directory")
                elif entry.is_dir(follow_symlinks=False):
                    lay.dirs.append(rel)
                    visit(entry.path, rel + "/")
                elif entry.is_file(follow_symlinks=False):
                    lay.files[rel] = entry.path
                    lay.inputs.append(os.path.realpath(entry.path))
                else:
                    raise ApplyError(f"{base}: '{rel}' is not a regular file or directory (FIFO, socket or device)")
            except OSError as exc:
                raise ApplyError(f"{base}: cannot examine '{rel}': {exc.strerror or exc}") from None

    visit(base, "")
    return lay


def _index_shards(base: str, index: str, files: dict[str, str]) -> list[str]:
    """The shard paths (relative to BASE) that ``index`` lists, checked: see the module doc."""
    try:
        size = os.path.getsize(index)
        if size > _MAX_INDEX_BYTES:
            raise ApplyError(f"{index}: {size:,} bytes, more than an index holds (limit {_MAX_INDEX_BYTES:,})")
        with open(index, "rb") as fh:
            raw = fh.read(_MAX_INDEX_BYTES + 1)
    except OSError as exc:
        raise ApplyError(f"{index}: cannot read: {exc.strerror or exc}") from None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ApplyError(f"{index}: not JSON ({type(exc).__name__}); expected an object with a 'weight_map'") from None
    if not isinstance(obj, dict):
        raise ApplyError(f"{index}: a JSON {type(obj).__name__}, expected an object with a 'weight_map'")
    wmap = obj.get("weight_map")
    if not isinstance(wmap, dict):
        got = "missing" if "weight_map" not in obj else f"a {type(wmap).__name__}"
        raise ApplyError(f"{index}: 'weight_map' is {got}, expected an object of tensor names to shard files")
    if not wmap:
        raise ApplyError(f"{index}: 'weight_map' is empty, expected tensor names mapped to shard files")
    bad = [k for k, v in wmap.items() if not isinstance(v, str) or not v]
    if bad:
        raise ApplyError(
            f"{index}: weight_map['{bad[0]}'] is {wmap[bad[0]]!r}, expected a shard file name"
            + (f" ({len(bad)} such entries)" if len(bad) > 1 else "")
        )
    shards = sorted(set(wmap.values()))
    escaping = [
        s for s in shards
        if os.path.isabs(s) or re.match(r"^[A-Za-z]:", s) or ".." in re.split(r"[\\/]", s) or "\0" in s
    ]
    if escaping:
        raise ApplyError(f"{index}: shard paths must stay inside BASE, got {preview(escaping)}")
    norm = {s: os.path.normpath(s).replace(os.sep, "/") for s in shards}
    not_st = [s for s in shards if not s.endswith(".safetensors")]
    if not_st:
        raise ApplyError(f"{index}: lists shards that are not .safetensors files: {preview(not_st)}")
    absent = [s for s in shards if norm[s] not in files]
    if absent:
        raise ApplyError(f"{index}: lists shards that are not files in {base}: {preview(absent)}")
    return sorted(set(norm.values()))


def _layout(base: str) -> _Layout:
    if os.path.isfile(base):
        if not base.endswith(".safetensors"):
            raise ApplyError(f"{base}: expected a .safetensors file or a model directory")
        lay = _Layout(base, single=True, shards=[os.path.basename(base)])
        lay.files[lay.shards[0]] = base
        lay.inputs.append(os.path.realpath(base))
        return lay
    if not os.path.isdir(base):
        raise ApplyError(f"{base}: no such file or directory")
    lay = _walk(base)
    if INDEX_NAME in lay.files:
        lay.shards = _index_shards(base, os.path.join(base, INDEX_NAME), lay.files)
    else:
        lay.shards = [r for r in lay.files if "/" not in r and r.endswith(".safetensors")]
        if not lay.shards:
            raise ApplyError(f"{base}: no .safetensors shards in the directory (and no {INDEX_NAME})")
    return lay


def _shard_path(lay: _Layout, rel: str) -> str:
    """The path to name a shard by in messages: the file itself for a single-file BASE."""
    return lay.base if lay.single else os.path.join(lay.base, rel)


def _headers(lay: _Layout) -> dict[str, StHeader]:
    out = {}
    for rel in lay.shards:
        where = _shard_path(lay, rel)
        out[rel] = read_header(lay.src(rel), lambda msg, w=where: ApplyError(f"{w}: {msg}"))
    return out


def _plan(lay: _Layout, headers: dict[str, StHeader], f: SldFile) -> dict[str, dict[str, Any]]:
    """shard -> {tensor key: module or tensor entry}, checked against every shard's header.

    A module entry adds its delta to the key's weight; a tensor entry (stored losslessly, e.g.
    PEFT's modules_to_save) replaces the key's tensor.
    """
    from .patch import resolve_names, unusable_reason

    where: dict[str, tuple[str, StEntry]] = {}
    for rel, h in headers.items():
        for e in h.entries:
            if e.name in where:
                raise ApplyError(
                    f"{lay.base}: tensor '{e.name}' is in two shards, {_shard_path(lay, where[e.name][0])} and "
                    f"{_shard_path(lay, rel)}; a loader would read only one of them"
                )
            where[e.name] = (rel, e)
    names = resolve_names(f, where)  # two entries reaching one tensor: refused here, whatever else fits
    plan: dict[str, dict[str, Any]] = {rel: {} for rel in lay.shards}
    problems = [f"{m.name}: no tensor '{m.name}.weight' (with or without 'base_model.model.')"
                for m in names.missing_modules]
    problems += [f"{t.name}: {unusable_reason(t.name)}" for t in names.missing_tensors]
    for m, key in names.modules:
        rel, e = where[key]
        want = [m.in_features, m.out_features] if m.fan_in_fan_out else [m.out_features, m.in_features]
        if list(e.shape) != want:
            problems.append(f"{m.name}: '{key}' is {list(e.shape)}, the file needs {want}")
        elif e.dtype not in _WEIGHT_DTYPES:
            problems.append(f"{m.name}: '{key}' has dtype {e.dtype}, expected {', '.join(_WEIGHT_DTYPES)}")
        else:
            plan[rel][key] = m
    for t, key in names.tensors:
        rel, e = where[key]
        if list(e.shape) != list(t.shape) or e.dtype not in _EXTRA_DTYPES:
            problems.append(f"{t.name}: '{key}' is {e.dtype} {list(e.shape)}, the file holds {list(t.shape)}")
        else:
            plan[rel][key] = t
    if problems:
        raise ApplyError(
            f"{f.path}: does not fit the checkpoint {lay.base} ({len(problems)} problem(s)): "
            + preview(problems, "; ") + "; nothing was written"
        )
    return plan


def _read_range(path: str, where: str, start: int, end: int) -> Iterator[bytes]:
    try:
        with open(path, "rb") as fh:
            fh.seek(start)
            pos = start
            while pos < end:
                chunk = fh.read(min(_READ_CHUNK, end - pos))
                if not chunk:
                    raise ApplyError(f"{where}: ends at byte {pos}, its header promised data up to {end}: truncated")
                pos += len(chunk)
                yield chunk
    except OSError as exc:
        raise ApplyError(f"{where}: cannot read: {exc.strerror or exc}") from None


def _patched(path: str, where: str, e: StEntry, entry: Any, f: SldFile) -> bytearray:
    """The bytes of tensor ``e`` with the adapter entry applied (W + ΔW formed in fp32 and rounded
    once to W's dtype, by the same kernel as deltacodec.apply; or W replaced)."""
    import torch

    from . import kernels
    from .patch import packed_factor

    buf = bytearray(e.end - e.start)
    view = memoryview(buf)
    pos = 0
    for chunk in _read_range(path, where, e.start, e.end):
        view[pos:pos + len(chunk)] = chunk
        pos += len(chunk)
    tdt = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[e.dtype]
    W = torch.frombuffer(buf, dtype=tdt).reshape(e.shape)
    with torch.no_grad():
        if isinstance(entry, TensorEntry):
            W.copy_(torch.from_numpy(np.ascontiguousarray(f.tensor(entry))))
            n = int((~torch.isfinite(W)).sum())
            if n:
                raise ApplyError(
                    f"{f.path}: '{entry.name}' would make {n} value(s) of '{e.name}' in {where} non-finite "
                    f"in {e.dtype}; nothing was written"
                )
            return buf
        try:
            # The kernel refuses a sum that is not finite in W's dtype before writing that chunk.
            kernels.delta_add(
                W, packed_factor(f, entry.A, W.device), packed_factor(f, entry.B, W.device),
                scale=entry.scale, omega=entry.omega if entry.sine else 0.0,
                gamma=entry.gamma if entry.sine else 1.0, sine=entry.sine,
                fan_in_fan_out=entry.fan_in_fan_out, backend="torch", name=f"'{e.name}' in {where}",
            )
        except ApplyError as exc:
            raise ApplyError(f"{f.path}: {exc}; nothing was written") from None
    return buf


def _write_shard(fh, lay: _Layout, rel: str, h: StHeader, items: dict[str, Any], f: SldFile) -> None:
    """One shard, tensor by tensor in its original order: patched ones from memory (one tensor
    at a time), the others copied as bytes."""
    path, where = lay.src(rel), _shard_path(lay, rel)
    specs = {}
    for e in h.entries:
        if e.name in items:
            chunks: Callable[[], Any] = lambda e=e: [_patched(path, where, e, items[e.name], f)]
        else:
            chunks = lambda e=e: _read_range(path, where, e.start, e.end)
        specs[e.name] = TensorSpec(e.dtype, e.shape, chunks, nbytes=e.end - e.start)
    write_safetensors(fh, specs, h.metadata, order="given")


def _copy(stage, lay: _Layout, rel: str) -> None:
    src = lay.src(rel)
    try:
        stage.copy(src, rel)
    except OSError as exc:
        if exc.filename == src:
            raise ApplyError(f"{lay.base}: cannot read '{rel}': {exc.strerror or exc}") from None
        raise


def apply_checkpoint(
    base: str | os.PathLike[str],
    sld_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    max_decoded_bytes: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[str]:
    """Write BASE patched with the adapter in ``sld_path`` to OUT; returns the files written.

    See the module doc for what BASE may be and what OUT receives. ``force`` replaces an
    existing OUT (whole, atomically); without it an existing OUT is refused (an empty directory
    is taken). ``max_decoded_bytes`` is passed to :class:`SldFile`. ``progress(i, n, shard)`` is
    called before each shard is written.
    """
    base, sld_path, out = os.fspath(base), os.fspath(sld_path), os.fspath(out)
    if not os.path.exists(base):
        raise ApplyError(f"{base}: no such file or directory")
    single = os.path.isfile(base)
    if single and not out.endswith(".safetensors"):
        raise ApplyError(f"{out}: BASE is one .safetensors file, so OUT must end in .safetensors")
    check_output(out, [base, sld_path], force=force, kind="file" if single else "dir")  # fail fast
    f = SldFile(sld_path, max_decoded_bytes=max_decoded_bytes)
    lay = _layout(base)
    headers = _headers(lay)
    plan = _plan(lay, headers, f)
    inputs = [base, sld_path, *lay.inputs]
    todo = [rel for rel in lay.shards if plan[rel]]

    if single:
        with atomic_file(out, inputs=inputs, force=force) as fh:
            if progress:
                progress(0, 1, lay.shards[0])
            _write_shard(fh, lay, lay.shards[0], headers[lay.shards[0]], plan[lay.shards[0]], f)
            if progress:
                progress(1, 1, "")
        return [out]

    with staged_directory(out, inputs=inputs, force=force) as stage:
        for d in lay.dirs:
            stage.makedirs(d)
        for rel in lay.files:
            if rel not in todo:
                _copy(stage, lay, rel)
        for text, rel in lay.links:
            stage.symlink(text, rel)
        for i, rel in enumerate(todo):
            if progress:
                progress(i, len(todo), rel)
            with stage.open(rel) as fh:
                _write_shard(fh, lay, rel, headers[rel], plan[rel], f)
        if progress:
            progress(len(todo), len(todo), "")
    return [os.path.join(out, rel) for rel in sorted(lay.files)]


def _cmd_apply(args: argparse.Namespace) -> int:
    from .cli_progress import stderr_progress

    paths = apply_checkpoint(
        args.base, args.file, args.output, force=args.force, max_decoded_bytes=args.max_decoded_bytes,
        progress=stderr_progress("apply", quiet=args.quiet),
    )
    if not args.quiet:
        print(f"wrote {len(paths)} file(s) to {args.output}")
    return 0


def add_apply_parser(sub) -> None:
    from .cli import size_arg

    p = sub.add_parser("apply", help="patch a safetensors checkpoint on disk with an .sld adapter")
    p.add_argument("base", metavar="BASE", help="model directory of safetensors shards, or one .safetensors file")
    p.add_argument("file", metavar="FILE.sld")
    p.add_argument("-o", "--output", required=True, help="output directory (or .safetensors for a single-file BASE)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (never BASE or anything in it)")
    p.add_argument(
        "--max-decoded-bytes", type=size_arg, default=None, metavar="SIZE",
        help="refuse an .sld whose decoded tensors need more (e.g. 4GiB; default 16 GiB)",
    )
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_apply)
