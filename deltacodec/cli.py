"""The ``sld`` command line: encode, decode, inspect, verify, and the analysis and apply verbs.

One convention for every verb, implemented once in :func:`run` (verbs only return 0 or raise):

- exit 0: success;
- exit 1: an error the library reports (:class:`SldError`, or an ``OSError``/``ValueError``/
  ``MemoryError``/``RecursionError`` meaning bad input, an ``ImportError`` for a missing extra): exactly one line ``sld: error: ...`` on stderr, no traceback;
- exit 2: a usage error (unknown verb, bad option value): argparse's usage text and message;
- exit 130: interrupted (Ctrl-C), one line ``sld: interrupted``;
- a warning from the library prints as one line ``sld: warning: ...`` and changes nothing else;
- stdout closed early by its reader (``sld inspect F | head``) ends the command quietly.

Any other exception is a bug in deltacodec and keeps its traceback. ``inspect`` reads only the
header and never imports torch.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from typing import Any, Sequence

from . import __version__
from .cli_args import bits_arg, finite_arg, gamma_arg, level_arg, limit_help, positive_arg, size_arg
from .cli_inspect import add_inspect_parser, add_verify_parser, inspect_summary, verify_file
from .cli_progress import break_line, stderr_progress
from .cli_text import one_line
from .errors import DeltacodecWarning, SldError
from .layouts import LAYOUT_NAMES

__all__ = ["main", "run", "build_parser", "error_message", "size_arg", "inspect_summary", "verify_file"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

EPILOG = """\
exit status:
  0    success
  1    error: one line 'sld: error: ...' on stderr (bad input file, refused output, ...)
  2    usage error: unknown verb, missing or invalid option (usage text on stderr)
  130  interrupted (Ctrl-C)
Warnings print as 'sld: warning: ...' on stderr and do not change the exit status. The progress
bar appears only when stderr is a terminal, and never with -q.
"""

# Errors that mean bad input, reported as one line. ImportError: an optional package is missing
# (the message says which); RecursionError: input nested deeper than Python can follow. Not
# KeyError, TypeError, AttributeError...: from deltacodec those are bugs, kept visible.
_REPORTED = (SldError, OSError, ValueError, MemoryError, RecursionError, ImportError)


# --------------------------------------------------------------------------------------------------
# encode / decode


def _is_sld_file(path: str) -> bool:
    from .format import MAGIC

    try:
        with open(path, "rb") as fh:
            return fh.read(len(MAGIC)) == MAGIC
    except OSError:  # not a readable file: the adapter reader reports it with its own words
        return False


def _cmd_encode(args: argparse.Namespace) -> int:
    from .codec import encode

    if _is_sld_file(args.src):
        raise SldError(f"{args.src}: this is an .sld file already (use 'sld decode' to get the adapter back)")
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
        force=args.force,
        layout=args.layout,
        container=args.container,
        size=args.size,
        bits_per_param=args.bits_per_param,
        max_error=args.max_error,
        refit=args.refit,
    )
    size = os.path.getsize(out)
    if not args.quiet:
        print(f"wrote {one_line(out)} ({size:,} bytes)")
    if args.report:
        from .report import weight_error_report

        print(weight_error_report(args.src, out, omega=args.omega, gamma=args.gamma, alpha=args.alpha,
                                  layout=args.layout))
    return 0


def _cmd_decode(args: argparse.Namespace) -> int:
    from .codec import decode

    paths = decode(
        args.file,
        args.output,
        dtype=args.dtype,
        progress=stderr_progress("decode", quiet=args.quiet),
        force=args.force,
        max_decoded_bytes=args.max_decoded_bytes,
        format=args.format,
        arch=args.arch,
        base_config=args.base_config,
    )
    if not args.quiet:
        for p in paths:
            print(f"wrote {one_line(p)}")
    return 0


# --------------------------------------------------------------------------------------------------
# parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sld",
        description="Encode, decode, inspect, verify, analyse and apply .sld files: quantized "
        "(sine-activated) LoRA adapters.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"sld (deltacodec) {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    e = sub.add_parser("encode", help="adapter directory or .safetensors/.bin -> .sld")
    e.add_argument("src", metavar="ADAPTER", help="adapter directory, .safetensors or .bin file (PEFT, diffusers or kohya-ss layout)")
    tg = e.add_mutually_exclusive_group()
    tg.add_argument("--bits", type=bits_arg, default=None,
                    help="1..8: k-means codebook of 2^N entries (ecsq/auto: N bits/param on average); 16: lossless "
                         "(bf16/fp16 factors bit-exact with --container 2, fp32 rounded to fp16); 32: lossless for "
                         "fp32 too (container 2 only; --quantizer is ignored for 16 and 32); default 3")
    tg.add_argument("--size", type=size_arg, metavar="SIZE",
                    help="target file size: bytes, or with a unit (3MB, 512KiB); lands at or under it within 5%%")
    tg.add_argument("--bits-per-param", type=positive_arg("bits-per-param"), metavar="B",
                    help="target file bits per factor parameter, e.g. 2.2")
    tg.add_argument("--max-error", type=positive_arg("max-error"), metavar="E",
                    help="largest relative ΔW error of any module, e.g. 0.05")
    e.add_argument("-o", "--output", help="output .sld path (default: beside the input)")
    e.add_argument("--force", action="store_true", help="replace the output if it exists (never an input)")
    e.add_argument("--omega", type=finite_arg("omega", nonzero=True),
                   help="sine frequency ω; makes the adapter a sine adapter")
    e.add_argument("--gamma", type=gamma_arg, help="sine divisor γ: a number or 'sqrt-in' (default)")
    e.add_argument("--alpha", type=finite_arg("alpha"),
                   help="lora_alpha: replaces the config's (and its alpha_pattern), or gives it to an adapter "
                        "without one (scale = alpha/r)")
    e.add_argument("--quantizer", choices=["kmeans", "uniform", "ecsq", "auto"], default=None,
                   help="kmeans (default with --bits), uniform, ecsq (entropy-constrained, rate-controlled; default "
                        "with --size/--bits-per-param/--max-error) or auto (ecsq or k-means per tensor)")
    e.add_argument("--container", type=int, choices=[1, 2], default=None,
                   help="container version: 2 (rANS, lighter header; default for ecsq/auto) or 1 (older readers; "
                        "default for kmeans/uniform)")
    e.add_argument("--no-refit", dest="refit", action="store_const", const=False, default=None,
                   help="ecsq/auto: do not refit lora_B against the quantized lora_A")
    e.add_argument("--layout", choices=list(LAYOUT_NAMES),
                   help="read the input as this layout instead of detecting it (default: detected)")
    e.add_argument("--level", type=level_arg, default=1, help="zstd level 1..22, 0 = no entropy stage; default 1")
    e.add_argument("--report", action="store_true", help="print the weight-space error per module")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary line")
    e.set_defaults(func=_cmd_encode)

    d = sub.add_parser("decode", help=".sld -> the adapter in the layout it was encoded from (or a llama.cpp GGUF adapter)")
    d.add_argument("file", metavar="FILE.sld")
    d.add_argument("-o", "--output", help="directory, or a path ending in .safetensors (default: FILE-decoded/); "
                   "with --format gguf a file (default: FILE.gguf)")
    d.add_argument("--force", action="store_true", help="replace the output if it exists (never an input)")
    d.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="dtype of lora_A/B (gguf: fp32 or fp16)")
    d.add_argument("--format", choices=["adapter", "gguf"], default="adapter",
                   help="adapter (default: the layout the file was encoded from, PEFT, diffusers or kohya) "
                   "or gguf: a llama.cpp LoRA adapter (plain LoRA; needs the gguf extra)")
    d.add_argument("--arch", help="gguf: the base model's architecture when the file does not record it "
                   "(LlamaForCausalLM, Qwen2ForCausalLM, ... or llama.cpp's name: llama, qwen2, ...)")
    d.add_argument("--base-config", metavar="CONFIG", help="gguf: the base model's config.json (or its directory): "
                   "architecture, and the head counts LLaMA-family q/k projections need")
    d.add_argument("--max-decoded-bytes", type=size_arg, metavar="SIZE", help=limit_help())
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary lines")
    d.set_defaults(func=_cmd_decode)

    add_inspect_parser(sub)
    add_verify_parser(sub)

    from .batch.cli import add_batch_parser
    from .cli_analysis import add_bd_parser, add_stats_parser
    from .cli_apply import add_apply_parser

    add_bd_parser(sub)
    add_stats_parser(sub)
    add_apply_parser(sub)
    add_batch_parser(sub)  # after encode: it copies encode's options
    return p


# --------------------------------------------------------------------------------------------------
# the one error / warning / exit-status convention


def error_message(exc: BaseException) -> str:
    """The text after ``sld: error: `` for an exception in :data:`_REPORTED` (one line)."""
    if isinstance(exc, OSError):
        names = [os.fsdecode(n) for n in (exc.filename, exc.filename2) if isinstance(n, (str, bytes))]
        text = ": ".join(([" -> ".join(names)] if names else []) + [exc.strerror or str(exc)])
    elif isinstance(exc, MemoryError):
        text = "out of memory" + (f": {exc}" if str(exc) else "")
    elif isinstance(exc, RecursionError):
        text = f"input nested too deeply to process ({exc})"
    elif isinstance(exc, ModuleNotFoundError) and exc.name:
        from .extras import install_hint

        text = f"{exc}: an optional dependency is missing ({install_hint(exc.name) or 'see the README for the extra that provides it'})"
    else:
        text = str(exc) or type(exc).__name__
    return one_line(text) or type(exc).__name__


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    break_line()
    print(f"sld: warning: {one_line(str(message))}", file=sys.stderr, flush=True)


def _quiet_stdout() -> None:
    """After EPIPE: point stdout at /dev/null so the interpreter's final flush stays silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file (e.g. captured): nothing to flush
        pass


def run(args: argparse.Namespace) -> int:
    """Run a parsed verb (``args.func``) under the convention above; returns the exit status."""
    with warnings.catch_warnings():
        # Library warnings always show (once per message); others follow Python's filters.
        warnings.filterwarnings("default", category=DeltacodecWarning)
        warnings.showwarning = _show_warning
        try:
            try:
                status = int(args.func(args) or 0)
            finally:
                break_line()
            sys.stdout.flush()  # inside the try: a closed pipe shows here, not at interpreter exit
            return status
        except BrokenPipeError:
            _quiet_stdout()
            return EXIT_OK
        except KeyboardInterrupt:
            print("sld: interrupted", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        except _REPORTED as exc:
            print(f"sld: error: {error_message(exc)}", file=sys.stderr, flush=True)
            return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """``sld ARGS``: the exit status (argparse's own exits, --help and usage errors, included)."""
    parser = build_parser()
    _tag_verb_parsers(parser)
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # argparse would report these with the top-level usage, not the verb's
            args._verb_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # --help/--version (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else (EXIT_OK if exc.code is None else EXIT_USAGE)
    previous = _terminate_as_interrupt()
    try:
        return run(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _tag_verb_parsers(parser: argparse.ArgumentParser) -> None:
    """Each parser records itself as ``_verb_parser`` (the innermost one wins: ``sld batch
    encode``), so an error about the arguments shows the usage of the verb that was typed."""
    parser.set_defaults(_verb_parser=parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _tag_verb_parsers(sub)


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C: temporaries removed, workers stopped, exit 130


def _terminate_as_interrupt() -> Any:
    """SIGTERM (``kill``, a job scheduler's stop) cleans up as Ctrl-C does; None when this is not
    the main thread (no handler can be set there) or SIGTERM is ignored."""
    try:
        previous = signal.getsignal(signal.SIGTERM)
        if previous == signal.SIG_IGN:
            return None
        signal.signal(signal.SIGTERM, _on_sigterm)
        return previous
    except ValueError:
        return None


if __name__ == "__main__":
    sys.exit(main())
