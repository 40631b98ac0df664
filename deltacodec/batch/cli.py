"""``sld batch encode|decode|verify``: the batch verbs of the command line.

``sld batch encode`` takes every option of ``sld encode`` that is an argument of
``deltacodec.encode`` (copied from that verb's parser when the parser is built, so an option
added there appears here), except -o, --force, --report and -q, which mean something else for
a batch. Output follows the CLI's convention: one line per failed item on stdout as it
happens, a summary line (or ``--json``), a progress bar only on a terminal; exit status 0
when every item succeeded or was skipped, 1 with one ``sld: error:`` line when some failed
(or the batch could not start), 130 on Ctrl-C (after the items running are recorded).
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

from ..cli_args import limit_help, size_arg
from ..cli_progress import break_line, stderr_progress
from ..cli_text import dumps, one_line
from ..errors import SldError

__all__ = ["add_batch_parser", "ENCODE_EXCLUDED"]

#: Options of ``sld encode`` that a batch does not take over: one output per item, --force and
#: -q are the batch's own, --report prints per file.
ENCODE_EXCLUDED = ("help", "src", "output", "force", "report", "quiet")

_DESCRIPTION = """\
Encode, decode or verify many files: SRC is a directory tree (adapters found by layout: a
directory with adapter_model.safetensors/.bin or pytorch_lora_weights.*, or a standalone
.safetensors; .sld files for decode/verify), a quoted glob ('hub/*/*.safetensors', ** recurses),
or a file listing paths one per line. DST mirrors SRC's relative paths and holds a manifest
(sld-batch-OP.jsonl, JSON lines) written as results arrive: a rerun skips items done with the
same source bytes and options and redoes those that changed or failed; a killed run loses at
most the items in flight. A bad item is recorded with its error and the batch goes on. Runs on
a local process pool (--workers), or on Ray (--ray: a local cluster; --ray-address: an
existing one; needs the ray extra)."""


def _common(p: argparse.ArgumentParser, *, dst_optional: bool = False) -> None:
    p.add_argument("src", metavar="SRC", help="directory tree, quoted glob, or file listing paths")
    if dst_optional:
        p.add_argument("dst", metavar="DST", nargs="?",
                       help="directory for the manifest (without it nothing is written or skipped)")
    else:
        p.add_argument("dst", metavar="DST", help="output directory (mirrors SRC; holds the manifest)")
    g = p.add_argument_group("batch")
    g.add_argument("--workers", type=_workers_arg, metavar="N",
                   help="worker processes (default: the CPUs available; with Ray: the cluster's CPUs)")
    where = g.add_mutually_exclusive_group()
    where.add_argument("--ray", action="store_true", help="run on a local Ray cluster started for the run")
    where.add_argument("--ray-address", metavar="ADDRESS", help="run on the Ray cluster at ADDRESS (e.g. ray://head:10001, auto)")
    g.add_argument("--force", action="store_true", help="redo every item and replace existing outputs (never an input)")
    g.add_argument("--root", metavar="DIR",
                   help="for a glob or a listing: the directory DST mirrors paths relative to "
                   "(default: the glob's leading directory, the listing's directory)")
    g.add_argument("--json", action="store_true", help="print the summary as JSON (strict) instead of text")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no per-item or summary lines")


def _workers_arg(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"workers: expected an integer, got '{text}'") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"workers must be at least 1, got {v}")
    return v


def encode_actions(sub: Any) -> list[argparse.Action]:
    """The optional actions of ``sld encode`` (registered on ``sub`` before this verb) that
    become ``sld batch encode`` options: those whose destination is a ``deltacodec.encode``
    argument, minus :data:`ENCODE_EXCLUDED`."""
    from .driver import _params

    enc = sub.choices.get("encode")
    if enc is None:
        return []
    params = _params("encode")
    return [a for a in enc._actions if a.option_strings and a.dest not in ENCODE_EXCLUDED and a.dest in params]


def add_batch_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``sld batch {encode,decode,verify}`` on the verbs' subparsers (after ``encode``)."""
    b = sub.add_parser("batch", help="encode, decode or verify many adapters: resumable, in parallel",
                       description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    ops = b.add_subparsers(dest="batch_op", metavar="OP")
    ops.required = True

    e = ops.add_parser("encode", help="every adapter of SRC -> DST/…/NAME.sld",
                       description="Encode every adapter of SRC into DST (a/b/ or a/b.safetensors -> DST/a/b.sld), "
                       "byte-identical to 'sld encode' of each with the same options.")
    _common(e)
    actions = encode_actions(sub)
    if actions:
        og = e.add_argument_group("encode options (as in 'sld encode')")
        for a in actions:
            og._add_action(copy.copy(a))  # the same option, type and default as sld encode
    e.set_defaults(func=_cmd_batch, option_dests=[a.dest for a in actions])

    d = ops.add_parser("decode", help="every .sld of SRC -> DST/…/NAME/ (the layout each was encoded from)",
                       description="Decode every .sld of SRC into DST (a/b.sld -> DST/a/b/ in the layout it was encoded from: PEFT, "
                       "diffusers or kohya-ss, as 'sld decode' writes it; or "
                       "DST/a/b.safetensors with --single-file).")
    _common(d)
    dg = d.add_argument_group("decode options (as in 'sld decode')")
    dg.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="dtype of lora_A/B")
    dg.add_argument("--max-decoded-bytes", type=size_arg, metavar="SIZE", help=limit_help())
    dg.add_argument("--single-file", action="store_true", help="write NAME.safetensors (config in its metadata), not NAME/")
    d.set_defaults(func=_cmd_batch, option_dests=["dtype", "max_decoded_bytes"])

    v = ops.add_parser("verify", help="check every section of every .sld of SRC",
                       description="Check every section of every .sld of SRC (as 'sld verify'). With DST the "
                       "results are recorded there and a rerun skips files verified before and unchanged since.")
    _common(v, dst_optional=True)
    v.add_argument("--max-decoded-bytes", type=size_arg, metavar="SIZE", help=limit_help())
    v.set_defaults(func=_cmd_batch, option_dests=["max_decoded_bytes"])
    return b


def _print_failure(rec: dict[str, Any]) -> None:
    if rec["status"] == "failed":
        break_line()
        print(f"failed: {one_line(rec['source'])}: {one_line(rec.get('error') or '')}", flush=True)


def _summary_line(s: Any) -> str:
    where = f"; manifest {one_line(s.manifest)}" if s.manifest else ""
    engine = f"{s.workers} {'local' if s.engine == 'local' else 'Ray'} worker{'s' if s.workers != 1 else ''}"
    return (f"batch {s.op}: {s.succeeded} succeeded, {s.failed} failed, {s.skipped} skipped "
            f"({s.total} items) in {s.seconds:.1f} s on {engine}{where}")


def _cmd_batch(args: argparse.Namespace) -> int:
    from .driver import count_items, run

    op = args.batch_op
    options = {k: getattr(args, k) for k in args.option_dests}
    engine = "ray" if (args.ray or args.ray_address) else "local"
    bar = stderr_progress(f"batch {op}", quiet=args.quiet)
    total = count_items(op, args.src, root=args.root, dst=args.dst) if bar.enabled else None
    quiet_lines = args.quiet or args.json
    s = run(op, args.src, args.dst, options=options, engine=engine, workers=args.workers, address=args.ray_address,
            force=args.force, root=args.root, single_file=getattr(args, "single_file", False),
            progress=bar, total=total, on_result=None if quiet_lines else _print_failure)
    break_line()
    if args.json:
        print(dumps(s.to_dict()))
    elif not args.quiet:
        print(_summary_line(s))
    if s.failed:
        where = f"; each is recorded in {s.manifest}" if s.manifest else ""
        raise SldError(f"{s.failed} of {s.total} items failed{where}")
    return 0
