"""The ``sld`` command line: encode, decode, inspect (and the analysis and apply verbs).

Every verb exits 0 on success and 1 with a one-line ``sld: error: ...`` on failure, never a
traceback for errors the library reports on purpose. ``inspect`` reads only the header and
never imports torch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Sequence

from . import __version__
from .errors import SldError

__all__ = ["main", "inspect_summary"]


def _gamma_arg(text: str) -> float | str:
    if text == "sqrt-in":
        return text
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'sqrt-in', got '{text}'") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"gamma must be a positive number, got {text}")
    return v


_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}


def size_arg(text: str) -> int:
    """A byte count as users type it: ``1048576``, ``3MB`` (10^6), ``4GiB`` (2^30), ``1.5GB``."""
    import re

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", text)
    unit = m and m.group(2).lower()
    if not m or unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(
            f"expected a size such as 1048576, 3MB or 4GiB (units B, kB, MB, GB, TB, KiB, MiB, GiB, TiB), got '{text}'"
        )
    value = float(m.group(1)) * _SIZE_UNITS[unit]
    if not math.isfinite(value) or value < 1 or value >= 2**63:
        raise argparse.ArgumentTypeError(f"size must be 1 byte .. 2^63, got '{text}'")
    return int(value)


def _bits_arg(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
    if not (1 <= v <= 8 or v == 16):
        raise argparse.ArgumentTypeError(f"bits must be 1..8 or 16, got {v}")
    return v


def _cmd_encode(args: argparse.Namespace) -> int:
    from .codec import encode, stderr_progress

    if args.src.endswith(".sld"):
        raise SldError(f"{args.src}: this is already an .sld file (use 'sld decode')")
    out = encode(
        args.src,
        bits=args.bits,
        out=args.output,
        omega=args.omega,
        gamma=args.gamma,
        alpha=args.alpha,
        quantizer=args.quantizer,
        level=args.level,
        progress=stderr_progress("encode", quiet=args.quiet),
    )
    size = os.path.getsize(out)
    if not args.quiet:
        print(f"wrote {out} ({size:,} bytes)")
    if args.report:
        from .report import weight_error_report

        print(weight_error_report(args.src, out, omega=args.omega, gamma=args.gamma, alpha=args.alpha))
    return 0


def _cmd_decode(args: argparse.Namespace) -> int:
    from .codec import decode, stderr_progress

    paths = decode(args.file, args.output, dtype=args.dtype, progress=stderr_progress("decode", quiet=args.quiet))
    if not args.quiet:
        for p in paths:
            print(f"wrote {p}")
    return 0


def inspect_summary(path: str) -> dict[str, Any]:
    """What ``sld inspect --json`` prints: header facts, one row per tensor, totals."""
    from .format import SldFile

    f = SldFile(path)
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
        }
        for m in f.modules
    ]
    omegas = sorted({m.omega for m in f.modules if m.sine})
    return {
        "file": f.path,
        "version": f.version,
        "bytes": f.file_size,
        "header_bytes": f.header_size,
        "method": f.metadata.get("method"),
        "encoder": f.metadata.get("encoder"),
        "base_model": f.metadata.get("base_model"),
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
    }


def _vs_fp16(ratio: float) -> str:
    # Tiny or 16-bit files can be larger than the raw fp16 factors (header, codebooks).
    return f"{ratio:.2f}x smaller than fp16" if ratio >= 1 else f"{1 / ratio:.2f}x larger than fp16"


def _cmd_inspect(args: argparse.Namespace) -> int:
    s = inspect_summary(args.file)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"{s['file']}: .sld version {s['version']}, {s['bytes']:,} bytes (header {s['header_bytes']:,})")
    print(f"  method      {s['method']}    encoder {s['encoder']}")
    print(f"  base model  {s['base_model'] or 'unknown'}")
    if s["omega"] is not None:
        print(f"  omega       {s['omega']}    gamma {s['gamma']}")
    print(f"  scale       {', '.join(f'{v:g}' for v in s['scales']) or '-'}")
    transposed = sum(m["fan_in_fan_out"] for m in s["modules"])
    if transposed:
        print(f"  layout      W is in×out (fan_in_fan_out) in {transposed} of {len(s['modules'])} modules")
    name_w = max([len(r["name"]) for r in s["tensors"]] + [6])
    print(f"  {'tensor':<{name_w}}  {'shape':>14}  {'bits':>4}  {'quantizer':>9}  {'bytes':>10}  {'bits/param':>10}")
    for r in s["tensors"]:
        shape = "x".join(map(str, r["shape"]))
        print(
            f"  {r['name']:<{name_w}}  {shape:>14}  {r['bits']:>4}  {str(r['quantizer']):>9}  "
            f"{r['bytes']:>10,}  {r['bits_per_param']:>10.3f}"
        )
    print(
        f"  total: {len(s['tensors'])} tensors, {s['params']:,} params, {s['bytes']:,} bytes, "
        f"{s['bits_per_param']:.3f} bits/param, {_vs_fp16(s['ratio_vs_fp16'])} "
        f"({s['fp16_bytes']:,} bytes)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sld",
        description="Encode, decode, inspect, analyse and apply .sld files: quantized (sine-activated) LoRA adapters.",
    )
    p.add_argument("--version", action="version", version=f"sld (deltacodec) {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    e = sub.add_parser("encode", help="adapter directory or .safetensors/.bin -> .sld")
    e.add_argument("src", metavar="ADAPTER", help="PEFT adapter directory, .safetensors or .bin file")
    e.add_argument("--bits", type=_bits_arg, default=3, help="1..8 (codebook) or 16 (float16); default 3")
    e.add_argument("-o", "--output", help="output .sld path (default: beside the input)")
    e.add_argument("--omega", type=float, help="sine frequency ω; makes the adapter a sine adapter")
    e.add_argument("--gamma", type=_gamma_arg, help="sine divisor γ: a number or 'sqrt-in' (default)")
    e.add_argument("--alpha", type=float, help="lora_alpha when the adapter has no config (scale = alpha/r)")
    e.add_argument("--quantizer", choices=["kmeans", "uniform"], default="kmeans")
    e.add_argument("--level", type=int, default=1, help="zstd level 1..22, 0 = no entropy stage; default 1")
    e.add_argument("--report", action="store_true", help="print the weight-space error per module")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary line")
    e.set_defaults(func=_cmd_encode)

    d = sub.add_parser("decode", help=".sld -> adapter in PEFT layout")
    d.add_argument("file", metavar="FILE.sld")
    d.add_argument("-o", "--output", help="directory, or a path ending in .safetensors (default: FILE-decoded/)")
    d.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="dtype of lora_A/B")
    d.add_argument("-q", "--quiet", action="store_true")
    d.set_defaults(func=_cmd_decode)

    i = sub.add_parser("inspect", help="print what an .sld file holds (header only)")
    i.add_argument("file", metavar="FILE.sld")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=_cmd_inspect)

    from .cli_analysis import add_bd_parser, add_stats_parser
    from .cli_apply import add_apply_parser

    add_bd_parser(sub)
    add_stats_parser(sub)
    add_apply_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SldError as exc:
        print(f"sld: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # Output piped into e.g. `head`: the reader left, nothing to report.
        sys.stdout = open(os.devnull, "w")
        return 0
    except (OSError, KeyError, ValueError) as exc:
        msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        where = f"{exc.filename}: " if isinstance(exc, OSError) and exc.filename else ""
        print(f"sld: error: {where}{msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sld: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
