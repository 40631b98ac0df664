"""``sld apply BASE file.sld -o OUT``: patch a checkpoint on disk, one shard at a time.

BASE is a model directory of safetensors shards (with ``model.safetensors.index.json``) or one
``.safetensors`` file. OUT receives patched shards with the same names, dtypes and index, plus a
copy of every other file in BASE. Every name and shape is checked from the shards' headers
before anything is written; the output is assembled in a temporary directory beside OUT and
renamed into place at the end, so a failure leaves no partial OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from .errors import ApplyError, preview

__all__ = ["apply_checkpoint", "add_apply_parser"]


def _shards(base: str) -> tuple[list[str], list[str]]:
    """(safetensors shard paths, other files) of a checkpoint."""
    if os.path.isfile(base):
        if not base.endswith(".safetensors"):
            raise ApplyError(f"{base}: expected a .safetensors file or a model directory")
        return [base], []
    if not os.path.isdir(base):
        raise ApplyError(f"{base}: no such file or directory")
    shards, others = [], []
    for name in sorted(os.listdir(base)):
        p = os.path.join(base, name)
        if not os.path.isfile(p):
            continue
        (shards if name.endswith(".safetensors") else others).append(p)
    if not shards:
        raise ApplyError(f"{base}: no .safetensors shards in the directory")
    index = os.path.join(base, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            wmap = json.load(fh).get("weight_map", {})
        listed = {os.path.join(base, v) for v in wmap.values()}
        absent = sorted(p for p in listed if not os.path.isfile(p))
        if absent:
            raise ApplyError(f"{index}: lists shards that do not exist: {', '.join(absent)}")
        shards = [s for s in shards if s in listed]
    return shards, others


def _plan(shards: list[str], f) -> dict[str, list[tuple[Any, str]]]:
    """shard -> [(module or tensor entry, tensor key)], checked against every shard's header.

    A module entry adds its delta to the key's weight; a tensor entry (stored losslessly, e.g.
    PEFT's modules_to_save) replaces the key's tensor.
    """
    from safetensors import safe_open

    from .patch import _candidates, unusable_reason

    where: dict[str, tuple[str, list[int], str]] = {}
    for s in shards:
        with safe_open(s, framework="pt") as fh:
            for k in fh.keys():
                sl = fh.get_slice(k)
                where[k] = (s, list(sl.get_shape()), sl.get_dtype())
    plan: dict[str, list[tuple[Any, str]]] = {s: [] for s in shards}
    problems = []
    for e in f.modules:
        key = next((c + ".weight" for c in _candidates(e.name) if c + ".weight" in where), None)
        if key is None:
            problems.append(f"{e.name}: no tensor '{e.name}.weight' (with or without 'base_model.model.')")
            continue
        shard, shape, dtype = where[key]
        want = [e.in_features, e.out_features] if e.fan_in_fan_out else [e.out_features, e.in_features]
        if shape != want:
            problems.append(f"{e.name}: '{key}' is {shape}, the file needs {want}")
        elif dtype not in ("F32", "F16", "BF16"):
            problems.append(f"{e.name}: '{key}' has dtype {dtype}, expected F32, F16 or BF16")
        else:
            plan[shard].append((e, key))
    for t in f.tensors:
        key = next((c for c in _candidates(t.name) if c in where), None)
        if key is None:
            problems.append(f"{t.name}: {unusable_reason(t.name)}")
            continue
        shard, shape, dtype = where[key]
        if shape != list(t.shape) or dtype not in ("F64", "F32", "F16", "BF16"):
            problems.append(f"{t.name}: '{key}' is {dtype} {shape}, the file holds {list(t.shape)}")
        else:
            plan[shard].append((t, key))
    if problems:
        raise ApplyError(
            f"{f.path}: does not fit the checkpoint ({len(problems)} problem(s)): "
            + preview(problems, "; ") + "; nothing was written"
        )
    return plan


def apply_checkpoint(base: str, sld_path: str, out: str, *, progress=None, force: bool = False) -> list[str]:
    """Write BASE patched with the adapter to OUT; returns the files written (see module doc)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from . import kernels
    from .format import SldFile, TensorEntry, _umask
    from .patch import packed_factor

    base_abs, out_abs = os.path.realpath(base), os.path.realpath(out)
    if base_abs == out_abs or out_abs.startswith(base_abs + os.sep):
        raise ApplyError(f"{out}: refusing to write into the base checkpoint {base}")
    single = os.path.isfile(base)
    if single and not out.endswith(".safetensors"):
        raise ApplyError(f"{out}: BASE is one .safetensors file, so OUT must end in .safetensors")
    if os.path.exists(out) and not force and (os.path.isfile(out) or os.listdir(out)):
        raise ApplyError(f"{out}: already exists (use --force to replace it)")
    f = SldFile(sld_path)
    shards, others = _shards(base)
    plan = _plan(shards, f)

    parent = os.path.dirname(out_abs)
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=".sld-apply-", dir=parent)
    os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes 0700; OUT gets what mkdir would give it
    written = []
    try:
        for i, shard in enumerate(shards):
            if progress:
                progress(i, len(shards), os.path.basename(shard))
            with safe_open(shard, framework="pt") as fh:
                meta = fh.metadata()
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            with torch.no_grad():
                for e, key in plan[shard]:
                    W = tensors[key]
                    if isinstance(e, TensorEntry):
                        W.copy_(torch.from_numpy(np.ascontiguousarray(f.tensor(e))))
                        continue
                    kernels.delta_add(
                        W, packed_factor(f, e.A, W.device), packed_factor(f, e.B, W.device),
                        scale=e.scale, omega=e.omega if e.sine else 0.0, gamma=e.gamma if e.sine else 1.0,
                        sine=e.sine, fan_in_fan_out=e.fan_in_fan_out, backend="torch",
                    )
            save_file(tensors, os.path.join(stage, os.path.basename(shard)), metadata=meta)
            del tensors
        if progress:
            progress(len(shards), len(shards), "")
        for p in others:
            shutil.copy2(p, os.path.join(stage, os.path.basename(p)))
        if single:
            os.replace(os.path.join(stage, os.path.basename(shards[0])), out)
            shutil.rmtree(stage)
            written = [out]
        else:
            if os.path.exists(out):
                shutil.rmtree(out) if os.path.isdir(out) else os.remove(out)
            os.replace(stage, out)
            written = [os.path.join(out, n) for n in sorted(os.listdir(out))]
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return written


def _cmd_apply(args: argparse.Namespace) -> int:
    from .codec import stderr_progress

    paths = apply_checkpoint(args.base, args.file, args.output, progress=stderr_progress("apply", quiet=args.quiet), force=args.force)
    if not args.quiet:
        print(f"wrote {len(paths)} file(s) to {args.output}")
    return 0


def add_apply_parser(sub) -> None:
    p = sub.add_parser("apply", help="patch a safetensors checkpoint on disk with an .sld adapter")
    p.add_argument("base", metavar="BASE", help="model directory of safetensors shards, or one .safetensors file")
    p.add_argument("file", metavar="FILE.sld")
    p.add_argument("-o", "--output", required=True, help="output directory (or .safetensors for a single-file BASE)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_apply)
