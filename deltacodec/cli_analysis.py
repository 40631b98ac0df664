"""The ``sld bd`` and ``sld stats`` verbs.

The main ``sld`` command registers them with :func:`add_bd_parser` and :func:`add_stats_parser`.
Each verb stores its handler as ``func`` in the parsed namespace; a handler returns 0 or raises,
and :func:`deltacodec.cli.run` turns errors and warnings into the one ``sld: error:`` /
``sld: warning:`` convention of every verb.

``sld stats`` only uses the reader interface ``deltacodec.load(path)`` (``.modules``,
``.dequantize(name)``, ``.nbytes_module(name)``) and ``deltacodec.read_adapter(path)``
(``.modules`` with ``.name, .A, .B, .sine, .omega, .gamma, .scale``).
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from deltacodec.cli_args import limit_help, size_arg
from deltacodec.cli_text import dumps, escape
from deltacodec.errors import DeltacodecWarning, SldError, preview


# --------------------------------------------------------------------------------------------------
# sld bd
# --------------------------------------------------------------------------------------------------


def _fmt_group(g: Any) -> str:
    return escape(str(g))


def format_bd_table(rows: list[dict], *, anchor: str, interpolation: str) -> str:
    """The BD rows as a text table in the style of the paper's Table 2."""
    lines = [f"Bjontegaard delta vs anchor '{escape(anchor)}' (interpolation: {interpolation})"]
    if not rows:
        lines.append("(no rows)")
        return "\n".join(lines)
    gw = max(5, *(len(_fmt_group(r["group"])) for r in rows))
    mw = max(6, *(len(escape(r["method"])) for r in rows))
    head = f"{'group':<{gw}}  {'method':<{mw}}  {'BD-rate':>9}  {'BD-quality':>10}  {'points':>6}"
    lines += [head, "-" * len(head)]
    for r in rows:
        flag = " *" if r.get("warnings") else ""
        lines.append(
            f"{_fmt_group(r['group']):<{gw}}  {escape(r['method']):<{mw}}  {r['bd_rate']:>+8.2f}%"
            f"  {r['bd_quality']:>+10.3f}  {str(r['n_test']) + '/' + str(r['n_anchor']):>6}{flag}"
        )
    lines.append("BD-rate: rate change at equal quality (negative = smaller);"
                 " BD-quality: quality change at equal rate, in the quality column's unit.")
    if any(r.get("warnings") for r in rows):
        lines.append("* see warnings (partial curve overlap)")
    return "\n".join(lines)


def _cmd_bd(args: argparse.Namespace) -> int:
    from deltacodec import analysis

    points = analysis.read_points_csv(args.points)
    anchor = args.anchor if args.anchor is not None else points[0].method
    rows = analysis.bd_table(
        points,
        anchor=anchor,
        method=args.method,
        min_overlap=args.min_overlap,
        errors="warn" if args.skip_bad else "raise",
    )
    if args.plot:
        analysis.plot_rd(points, args.plot, rows=rows, title=f"{Path(args.points).name}: anchor {anchor}")
    if args.json:
        out = {"anchor": anchor, "interpolation": args.method, "rows": rows}
        print(dumps(out))
    else:
        print(format_bd_table(rows, anchor=anchor, interpolation=args.method))
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0


def add_bd_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``sld bd POINTS.csv [--anchor NAME] [--method M] [--plot PNG] [--json]``."""
    from deltacodec.analysis import INTERPOLATIONS

    p = subparsers.add_parser(
        "bd",
        help="Bjontegaard-Delta (BD-rate / BD-quality) of rate/quality curves",
        description=(
            "Read RD points from a CSV with columns method, group, rate, quality (rate in any unit)"
            " and print, per group, the BD-rate (%) and BD-quality of every method against the"
            " anchor, computed with the bjontegaard package."
        ),
    )
    p.add_argument("points", metavar="POINTS.csv", help="CSV file with columns method, group, rate, quality")
    p.add_argument("--anchor", metavar="NAME", help="reference method (default: the first method in the file)")
    p.add_argument("--method", choices=INTERPOLATIONS, default="akima", help="interpolation (default: akima)")
    p.add_argument("--plot", metavar="PNG", help="also write the RD curves (log rate axis) to this PNG")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.add_argument("--min-overlap", type=float, default=0.75, metavar="F",
                   help="warn when two curves overlap on less than this fraction (default 0.75)")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out (with a warning) rows whose curves are unusable instead of failing")
    p.set_defaults(func=_cmd_bd)
    return p


# --------------------------------------------------------------------------------------------------
# sld stats
# --------------------------------------------------------------------------------------------------


def _np32(x: Any, what: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().to("cpu").float().numpy()
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise SldError(f"{what}: expected a 2-D matrix, got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _reader(name: str):
    import deltacodec

    fn = getattr(deltacodec, name, None)
    if fn is None:
        raise SldError(f"this deltacodec has no deltacodec.{name}() (the reader is not installed)")
    return fn


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


def _module_row_base(m: Any) -> dict:
    return {
        "name": str(m.name),
        "sine": bool(m.sine),
        "omega": _opt_float(getattr(m, "omega", None)),
        "gamma": _opt_float(getattr(m, "gamma", None)),
        "scale": _opt_float(getattr(m, "scale", 1.0)),
    }


#: File suffixes read as adapters (PEFT weights) rather than as .sld files.
ADAPTER_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _is_adapter_path(path: Path) -> bool:
    """A directory or a PEFT weight file is an adapter; anything else is handed to the .sld reader."""
    return path.is_dir() or path.suffix.lower() in ADAPTER_SUFFIXES


def collect_stats(file: str | Path, source: str | Path | None = None, *,
                  max_decoded_bytes: int | None = None) -> dict:
    """Per-module and total statistics of an ``.sld`` file or an adapter (see ``sld stats``).

    FILE is an adapter when it is a directory or a ``.safetensors``/``.bin``/``.pt`` file (read with
    ``deltacodec.read_adapter``), otherwise an ``.sld`` file (read with ``deltacodec.load``, passing
    ``max_decoded_bytes`` when it is given).
    """
    from deltacodec.analysis import module_stats

    path = Path(file)
    if not path.exists():
        raise SldError(f"{path}: no such file or directory")
    src_mods: dict | None = None
    if source is not None:
        spath = Path(source)
        if not spath.exists():
            raise SldError(f"--source {spath}: no such file or directory")
        if _is_adapter_path(path):
            raise SldError("--source only applies when FILE is an .sld file")
        src = _reader("read_adapter")(spath)
        src_mods = {str(m.name): m for m in src.modules}

    modules: list[dict] = []
    if _is_adapter_path(path):  # an adapter: full precision only
        kind = "adapter"
        adapter = _reader("read_adapter")(path)
        for m in adapter.modules:
            A, B = _np32(m.A, f"{m.name}.A"), _np32(m.B, f"{m.name}.B")
            row = _module_row_base(m)
            row.update(rank=A.shape[0], out_features=B.shape[0], in_features=A.shape[1],
                       bits=None, nbytes=None, bits_per_param=None)
            row.update(module_stats(A, B, omega=row["omega"], gamma=row["gamma"],
                                    scale=row["scale"], sine=row["sine"]))
            modules.append(row)
        file_bytes = None
    else:
        kind = "sld"
        limit = {} if max_decoded_bytes is None else {"max_decoded_bytes": max_decoded_bytes}
        f = _reader("load")(path, **limit)
        for m in f.modules:
            name = str(m.name)
            A_q, B_q = (_np32(x, f"{name} (dequantized)") for x in f.dequantize(name))
            nbytes = int(f.nbytes_module(name))
            rank, out_f, in_f = int(m.rank), int(m.out_features), int(m.in_features)
            if A_q.shape != (rank, in_f) or B_q.shape != (out_f, rank):
                raise SldError(
                    f"{name}: dequantized shapes A {A_q.shape}, B {B_q.shape} do not match"
                    f" rank {rank}, {out_f} x {in_f}"
                )
            params = rank * (in_f + out_f)
            row = _module_row_base(m)
            row.update(rank=rank, out_features=out_f, in_features=in_f,
                       bits=None if m.bits is None else [int(b) for b in m.bits], nbytes=nbytes,
                       bits_per_param=8.0 * nbytes / params if params else None)
            A = B = None
            if src_mods is not None:
                s = src_mods.get(name)
                if s is None:
                    raise SldError(f"module {name!r} is in {path} but not in the --source adapter")
                A, B = _np32(s.A, f"{name}.A (source)"), _np32(s.B, f"{name}.B (source)")
                if A.shape != A_q.shape or B.shape != B_q.shape:
                    raise SldError(
                        f"{name}: source shapes A {A.shape}, B {B.shape} differ from the file's"
                        f" A {A_q.shape}, B {B_q.shape}"
                    )
            st = module_stats(A, B, A_q=A_q, B_q=B_q, omega=row["omega"], gamma=row["gamma"],
                              scale=row["scale"], sine=row["sine"])
            row.update(st)
            modules.append(row)
        file_bytes = path.stat().st_size
        if src_mods is not None:
            extra = sorted(set(src_mods) - {r["name"] for r in modules})
            if extra:
                warnings.warn(f"{len(extra)} module(s) of --source are not in {path}: {preview(extra, limit=5)}",
                              DeltacodecWarning, stacklevel=2)

    total: dict = {"modules": len(modules)}
    params = sum(r["rank"] * (r["in_features"] + r["out_features"]) for r in modules)
    total["params"] = params
    if kind == "sld":
        nb = sum(r["nbytes"] for r in modules)
        total["nbytes_modules"] = nb
        total["file_bytes"] = file_bytes
        total["bits_per_param"] = 8.0 * nb / params if params else None
        total["file_bits_per_param"] = 8.0 * file_bytes / params if params else None
    for key in ("sr_lowrank", "sr_lowrank_q", "sr_sine", "sr_sine_q", "rel_error"):
        vals = [r[key] for r in modules if r.get(key) is not None]
        if vals:
            total[f"mean_{key}"] = float(np.mean(vals))
    err = [(r["abs_error"], r["dw_norm"]) for r in modules if "abs_error" in r]
    if err:
        num = math.sqrt(sum(a * a for a, _ in err))
        den = math.sqrt(sum(d * d for _, d in err))
        total["rel_error"] = num / den if den else (0.0 if num == 0 else math.inf)
    return {"file": str(path), "kind": kind, "source": None if source is None else str(source),
            "modules": modules, "total": total}


def _f(x: Any, spec: str) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


def format_stats(stats: dict) -> str:
    """``collect_stats`` output as a text table."""
    mods = stats["modules"]
    names = [escape(r["name"]) for r in mods]
    nw = max([6] + [len(n) for n in names])
    head = (f"{'module':<{nw}}  {'r':>3}  {'out x in':>11}  {'bits':>5}  {'b/param':>7}  {'SR(BA)':>7}"
            f"  {'SR(QQ)':>7}  {'SR(sin)':>8}  {'SR(sinQ)':>8}  {'rel.err':>9}")
    lines = [f"{stats['kind']} {escape(stats['file'], backslash=False)}"
             + (f" vs source {escape(stats['source'], backslash=False)}" if stats["source"] else ""),
             head, "-" * len(head)]
    for name, r in zip(names, mods):
        bits = "-" if r["bits"] is None else "/".join(str(b) for b in r["bits"])
        shape = f"{r['out_features']}x{r['in_features']}"
        lines.append(
            f"{name:<{nw}}  {r['rank']:>3}  {shape:>11}  {bits:>5}  {_f(r['bits_per_param'], '.3f'):>7}"
            f"  {_f(r.get('sr_lowrank'), '.2f'):>7}  {_f(r.get('sr_lowrank_q'), '.2f'):>7}"
            f"  {_f(r.get('sr_sine'), '.2f'):>8}  {_f(r.get('sr_sine_q'), '.2f'):>8}"
            f"  {_f(r.get('rel_error'), '.3e'):>9}"
        )
    t = stats["total"]
    lines.append("-" * len(head))
    lines.append(
        f"{'mean':<{nw}}  {'':>3}  {'':>11}  {'':>5}  {_f(t.get('bits_per_param'), '.3f'):>7}"
        f"  {_f(t.get('mean_sr_lowrank'), '.2f'):>7}  {_f(t.get('mean_sr_lowrank_q'), '.2f'):>7}"
        f"  {_f(t.get('mean_sr_sine'), '.2f'):>8}  {_f(t.get('mean_sr_sine_q'), '.2f'):>8}"
        f"  {_f(t.get('mean_rel_error'), '.3e'):>9}"
    )
    summary = [f"{t['modules']} modules, {t['params']} parameters"]
    if stats["kind"] == "sld":
        summary.append(f"{t['nbytes_modules']} bytes in modules ({_f(t['bits_per_param'], '.3f')} bits/param),"
                       f" file {t['file_bytes']} bytes ({_f(t['file_bits_per_param'], '.3f')} bits/param)")
    if "rel_error" in t:
        summary.append(f"whole-adapter relative weight error {_f(t['rel_error'], '.3e')}")
    lines.append("; ".join(summary))
    return "\n".join(lines)


def _cmd_stats(args: argparse.Namespace) -> int:
    stats = collect_stats(args.file, args.source, max_decoded_bytes=args.max_decoded_bytes)
    if args.json:
        print(dumps(stats))
    else:
        print(format_stats(stats))
    return 0


def add_stats_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``sld stats FILE [--source ADAPTER] [--json] [--max-decoded-bytes SIZE]``."""
    p = subparsers.add_parser(
        "stats",
        help="stable ranks, weight-space error and bits/param of an .sld file or an adapter",
        description=(
            "Per module and in total: stable ranks of B@A and sin(omega B@A) (quantized and, with"
            " --source, full precision), the relative weight-space error of the quantized update"
            " against --source, and bits per parameter."
        ),
    )
    p.add_argument("file", metavar="FILE",
                   help=".sld file, or an adapter (directory or .safetensors/.bin file)")
    p.add_argument("--source", metavar="ADAPTER", help="the full-precision adapter the .sld was made from")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.add_argument("--max-decoded-bytes", type=size_arg, metavar="SIZE", help=limit_help())
    p.set_defaults(func=_cmd_stats)
    return p
