"""Text and JSON the ``sld`` command prints: safe for a terminal, strict for a parser.

Names and metadata come from files, which anyone may have written: a tensor named
``"x\\x1b[2J"`` must not clear the user's screen, and one named ``"x\\nsld: error: ..."`` must not
forge a line of output. :func:`escape` shows every non-printable character as an escape;
:func:`dumps` writes strict JSON (RFC 8259: no NaN/Infinity tokens, ASCII only) for any value
the ``.sld`` reader can hand back, at any nesting depth.

JSON representation of values JSON has no type for (each a one-key object whose key starts
with ``$``; a map key that itself starts with ``$`` is written with one more ``$``, so the
representation is unambiguous and can be inverted):

- bytes: ``{"$bytes_hex": "00ff"}``; a bytes map key: the string ``"$bytes_hex:00ff"``
- NaN, +Inf, -Inf: ``{"$float": "nan"}``, ``{"$float": "inf"}``, ``{"$float": "-inf"}``
- an integer outside ±(2^53 - 1), which many JSON parsers round: ``{"$int": "18446744073709551615"}``
- a msgpack timestamp: ``{"$timestamp": {"seconds": S, "nanoseconds": N}}``
- anything else (never produced by the reader): ``{"$repr": "<Python repr>"}``
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterator

import msgpack

__all__ = ["escape", "one_line", "dumps", "MAX_SAFE_INT"]

#: The largest integer every JSON parser reads exactly (IEEE double has a 53-bit significand).
MAX_SAFE_INT = 2**53 - 1

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(c: str) -> str:
    if c in _NAMED:
        return _NAMED[c]
    o = ord(c)
    if o < 0x100:
        return f"\\x{o:02x}"
    if o < 0x10000:
        return f"\\u{o:04x}"
    return f"\\U{o:08x}"


def escape(text: str, *, backslash: bool = True) -> str:
    """``text`` with every non-printable character (controls, format characters such as bidi
    overrides, separators other than the space, lone surrogates) written as ``\\n``, ``\\t``,
    ``\\xNN``, ``\\uNNNN`` or ``\\UNNNNNNNN``. With ``backslash`` a literal backslash is doubled,
    so the escaped form is unambiguous (for names read from a file)."""
    if text.isprintable() and not (backslash and "\\" in text):
        return text
    out = []
    for c in text:
        if c == "\\" and backslash:
            out.append("\\\\")
        elif c.isprintable():
            out.append(c)
        else:
            out.append(_escape_char(c))
    return "".join(out)


def one_line(message: str) -> str:
    """A message (error or warning) as one terminal-safe line: line breaks and every other
    non-printable shown escaped, as in names (a name holding a newline reads the same in an
    error as in ``inspect``). Backslashes are kept: messages quote Python reprs such as
    ``b'\\x89SLD'``."""
    return escape(str(message).strip(), backslash=False)


# --------------------------------------------------------------------------------------------------
# strict JSON


def _key(k: Any) -> str:
    if isinstance(k, str):
        return "$" + k if k.startswith("$") else k
    if isinstance(k, (bytes, bytearray, memoryview)):
        return "$bytes_hex:" + bytes(k).hex()
    return "$repr:" + repr(k)


def _str(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates (an undecodable path from argv): not valid JSON text
        s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    return json.dumps(s, ensure_ascii=True)


def _scalar(x: Any) -> str:
    """JSON text of a non-container value."""
    if x is None or isinstance(x, bool):
        return json.dumps(x)
    if isinstance(x, str):
        return _str(x)
    if isinstance(x, int):
        return "%d" % x if -MAX_SAFE_INT <= x <= MAX_SAFE_INT else '{"$int": "%d"}' % x
    if isinstance(x, float):
        if math.isnan(x):
            return '{"$float": "nan"}'
        if math.isinf(x):
            return '{"$float": "inf"}' if x > 0 else '{"$float": "-inf"}'
        return float.__repr__(x)
    if isinstance(x, (bytes, bytearray, memoryview)):
        return '{"$bytes_hex": "%s"}' % bytes(x).hex()
    if hasattr(x, "item") and hasattr(x, "dtype") and getattr(x, "ndim", None) == 0:  # numpy scalar
        return _scalar(x.item())
    if isinstance(x, msgpack.Timestamp):  # ext type -1: msgpack decodes it whatever the ext_hook
        return '{"$timestamp": {"seconds": %d, "nanoseconds": %d}}' % (x.seconds, x.nanoseconds)
    return '{"$repr": %s}' % _str(repr(x))


def _items(x: Any) -> tuple[str, str, Iterator[tuple[str | None, Any]]] | None:
    if isinstance(x, dict):
        return "{", "}", ((_key(k), v) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return "[", "]", ((None, v) for v in x)
    return None


_END = object()


def dumps(obj: Any, *, indent: int | None = 2) -> str:
    """Strict, ASCII-only JSON text of ``obj`` (see the module docstring for the ``$`` forms).

    Iterative, not recursive: metadata nested a thousand levels deep (which the msgpack reader
    accepts) is written without hitting Python's recursion limit. ``indent=None`` gives one line.
    """
    parts: list[str] = []
    item_sep = "," if indent is not None else ", "

    def newline(depth: int) -> str:
        return "\n" + " " * (indent * depth) if indent is not None else ""

    stack: list[list[Any]] = []  # [items iterator, closer, depth, nothing written yet]

    def begin(value: Any, depth: int) -> None:
        c = _items(value)
        if c is None:
            parts.append(_scalar(value))
        else:
            parts.append(c[0])
            stack.append([c[2], c[1], depth, True])

    begin(obj, 0)
    while stack:
        frame = stack[-1]
        items, closer, depth, empty = frame
        nxt = next(items, _END)
        if nxt is _END:
            stack.pop()
            if not empty:
                parts.append(newline(depth))
            parts.append(closer)
            continue
        if not empty:
            parts.append(item_sep)
        frame[3] = False
        parts.append(newline(depth + 1))
        key, value = nxt
        if key is not None:
            parts.append(_str(key) + ": ")
        begin(value, depth + 1)
    return "".join(parts)
