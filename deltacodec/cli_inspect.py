"""``sld inspect`` (what the header says) and ``sld verify`` (every section checked).

``inspect`` reads the header only: it is fast on any file and never imports torch, but it does
not look at the sections, so a file whose sections are corrupt still inspects fine. ``verify``
reads and checks every section. Every string that comes from the file (names, metadata) is
printed escaped (:mod:`deltacodec.cli_text`); ``--json`` output is strict JSON.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from .cli_args import limit_help, size_arg
from .cli_text import dumps, escape, one_line
from .errors import SldError

__all__ = ["inspect_summary", "format_inspect", "verify_file", "add_inspect_parser", "add_verify_parser"]


def _open(path: str, max_decoded_bytes: int | None):
    from .format import SldFile

    return SldFile(path, max_decoded_bytes=max_decoded_bytes)


def _v2_facts(e: Any) -> dict[str, Any]:
    """Version 2: a quantized tensor's number of levels (table symbols) and side-information
    bytes (in the header), a lossless one's stored and coded field streams."""
    if e.coder is None:
        return {"levels": None, "side_bytes": 0}
    side = e.coder[1]
    if e.encoding == "codebook":
        return {"levels": side.table.size, "side_bytes": side.nbytes}
    return {"levels": None, "side_bytes": 0, "fields_coded": len(side.tables) - side.stored,
            "fields_stored": side.stored}


def inspect_summary(path: str, *, max_decoded_bytes: int | None = None) -> dict[str, Any]:
    """What ``sld inspect --json`` prints: header facts, one row per tensor, totals, and the
    whole header metadata (any msgpack value; :func:`deltacodec.cli_text.dumps` writes it)."""
    f = _open(path, max_decoded_bytes)
    rows = []
    params = 0
    for e in f.entries():
        n = e.numel
        params += n
        rows.append(
            {
                "name": e.name,
                "shape": list(e.shape),
                "encoding": e.encoding,
                "bits": e.bits,
                "quantizer": e.quantizer if e.encoding == "codebook" else e.dtype,
                "compression": e.compression,
                "bytes": e.length,
                "bits_per_param": 8.0 * e.length / n,
                **(_v2_facts(e) if f.version == 2 else {}),
            }
        )
    modules = [
        {
            "name": m.name,
            "kind": "sine" if m.sine else "lora",
            "rank": m.rank,
            "out_features": m.out_features,
            "in_features": m.in_features,
            "scale": m.scale,
            "omega": m.omega,
            "gamma": m.gamma,
            "fan_in_fan_out": m.fan_in_fan_out,
            "weight_shape": list(m.weight_shape) if m.weight_shape else None,  # a conv module's kernel
        }
        for m in f.modules
    ]
    omegas = sorted({m.omega for m in f.modules if m.sine})
    meta = f.metadata
    return {
        "file": f.path,
        "version": f.version,
        "bytes": f.file_size,
        "header_bytes": f.header_size,
        "sections_checked": False,
        "method": meta.get("method"),
        "encoder": meta.get("encoder"),
        "base_model": meta.get("base_model"),
        # Absent means PEFT (spec 3.3); anything else is shown as recorded, escaped on output.
        "layout": meta.get("layout", "peft"),
        "omega": omegas[0] if len(omegas) == 1 else omegas or None,
        "gamma": "sqrt(in_features)"
        if f.modules and all(m.sine and math.isclose(m.gamma, math.sqrt(m.in_features)) for m in f.modules)
        else sorted({m.gamma for m in f.modules if m.sine}) or None,
        "scales": sorted({m.scale for m in f.modules}),
        "modules": modules,
        "tensors": rows,
        "params": params,
        "bits_per_param": 8.0 * f.file_size / params,
        "fp16_bytes": 2 * params,
        "ratio_vs_fp16": 2 * params / f.file_size,
        "metadata": meta,
    }


def _show(value: Any, missing: str = "-") -> str:
    """A metadata value on one terminal-safe line: strings escaped, anything else as compact JSON."""
    if value is None:
        return missing
    if isinstance(value, str):
        return escape(value)
    return dumps(value, indent=None)


def _vs_fp16(ratio: float) -> str:
    # Tiny or 16-bit files can be larger than the raw fp16 factors (header, codebooks).
    return f"{ratio:.2f}x smaller than fp16" if ratio >= 1 else f"{1 / ratio:.2f}x larger than fp16"


def format_inspect(s: dict[str, Any]) -> str:
    """:func:`inspect_summary` as the text ``sld inspect`` prints."""
    lines = [f"{one_line(s['file'])}: .sld version {s['version']}, {s['bytes']:,} bytes (header {s['header_bytes']:,})"]
    lines.append(f"  method      {_show(s['method'])}    encoder {_show(s['encoder'])}")
    lines.append(f"  base model  {_show(s['base_model'], 'unknown')}")
    lines.append(f"  layout      {_show(s['layout'])} (what 'sld decode' writes back)")
    if s["omega"] is not None:
        lines.append(f"  omega       {s['omega']}    gamma {s['gamma']}")
    lines.append(f"  scale       {', '.join(f'{v:g}' for v in s['scales']) or '-'}")
    if s["version"] == 2:
        side = sum(r.get("side_bytes", 0) for r in s["tensors"])
        q = sum(1 for r in s["tensors"] if r.get("levels"))
        lines.append(f"  container   v2: {q} rANS-coded quantized tensors (at most "
                     f"{max([r['levels'] for r in s['tensors'] if r.get('levels')] or [0])} levels), "
                     f"side information {side:,} bytes in the header")
    transposed = sum(m["fan_in_fan_out"] for m in s["modules"])
    if transposed:
        lines.append(f"  orientation W is in×out (fan_in_fan_out) in {transposed} of {len(s['modules'])} modules")
    names = [escape(r["name"]) for r in s["tensors"]]
    name_w = max([len(n) for n in names] + [6])
    lines.append(
        f"  {'tensor':<{name_w}}  {'shape':>14}  {'bits':>4}  {'quantizer':>9}  {'bytes':>10}  {'bits/param':>10}"
    )
    for name, r in zip(names, s["tensors"]):
        shape = "x".join(map(str, r["shape"]))
        lines.append(
            f"  {name:<{name_w}}  {shape:>14}  {r['bits']:>4}  {str(r['quantizer']):>9}  "
            f"{r['bytes']:>10,}  {r['bits_per_param']:>10.3f}"
        )
    lines.append(
        f"  total: {len(s['tensors'])} tensors, {s['params']:,} params, {s['bytes']:,} bytes, "
        f"{s['bits_per_param']:.3f} bits/param, {_vs_fp16(s['ratio_vs_fp16'])} "
        f"({s['fp16_bytes']:,} bytes)"
    )
    lines.append("  sections not checked (header only): run 'sld verify' to check every section")
    return "\n".join(lines)


def _cmd_inspect(args: argparse.Namespace) -> int:
    s = inspect_summary(args.file, max_decoded_bytes=args.max_decoded_bytes)
    print(dumps(s) if args.json else format_inspect(s))
    return 0


# --------------------------------------------------------------------------------------------------
# verify


def verify_file(path: str, *, max_decoded_bytes: int | None = None) -> dict[str, Any]:
    """Check every section of an ``.sld`` file; raise the reader's :class:`SldError` naming the
    file and the first bad tensor, or return ``{"file", "ok", "modules", "tensors", "bytes",
    "decoded_bytes"}``.

    Checks: the header (as ``inspect``), then per section its CRC-32, decompression bounded by
    the size the shape implies, zero padding bits, indices within the codebook, and finite
    decoded values. Peak memory is one decoded tensor.
    """
    with _open(path, max_decoded_bytes) as f:
        f.verify()
        return {
            "file": f.path,
            "ok": True,
            "modules": len(f.modules),
            "tensors": sum(1 for _ in f.entries()),
            "bytes": f.file_size,
            "decoded_bytes": f.decoded_nbytes,
        }


def _cmd_verify(args: argparse.Namespace) -> int:
    results: list[dict[str, Any]] = []
    try:
        for path in args.files:
            try:
                r = verify_file(path, max_decoded_bytes=args.max_decoded_bytes)
            except SldError as exc:
                results.append({"file": path, "ok": False, "error": str(exc)})
                raise
            results.append(r)
            if not args.json:
                print(
                    f"{one_line(r['file'])}: OK ({r['tensors']} tensors in {r['modules']} modules, "
                    f"{r['bytes']:,} bytes, every section checked)",
                    flush=True,
                )
    finally:
        # With --json the machine reader gets the record up to the first bad file as well as the
        # error line on stderr and exit status 1.
        if args.json:
            print(dumps({"ok": all(r["ok"] for r in results) and len(results) == len(args.files),
                         "files": results}))
    return 0


# --------------------------------------------------------------------------------------------------
# parsers


def add_inspect_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``sld inspect FILE.sld [--json] [--max-decoded-bytes SIZE]``."""
    i = sub.add_parser(
        "inspect",
        help="print what an .sld file holds (header only; see verify)",
        description="Print the header of an .sld file: modules, tensors, sizes, metadata. Only the header "
        "is read and checked; 'sld verify' checks every section.",
    )
    i.add_argument("file", metavar="FILE.sld")
    i.add_argument("--json", action="store_true", help="machine-readable output (strict JSON)")
    i.add_argument("--max-decoded-bytes", type=size_arg, metavar="SIZE", help=limit_help())
    i.set_defaults(func=_cmd_inspect)
    return i


def add_verify_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``sld verify FILE.sld [FILE.sld ...] [--json] [--max-decoded-bytes SIZE]``."""
    v = sub.add_parser(
        "verify",
        help="check every section of .sld files (CRC, decompression, values)",
        description="Decode and check every section of each file: CRC-32, bounded decompression, padding, "
        "index range, finite values. Prints 'FILE: OK ...' per good file; stops at the first bad "
        "file with exit status 1 and one 'sld: error:' line naming the file and tensor.",
    )
    v.add_argument("files", metavar="FILE.sld", nargs="+")
    v.add_argument("--json", action="store_true",
                   help='print {"ok": ..., "files": [...]} as strict JSON (also on failure, up to the bad file)')
    v.add_argument("--max-decoded-bytes", type=size_arg, metavar="SIZE", help=limit_help())
    v.set_defaults(func=_cmd_verify)
    return v
