"""What ``sld`` prints: untrusted strings escaped in text, strict JSON for any metadata the reader
accepts, and a progress bar only on a terminal."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cli_helpers import REPO, assert_one_line_error, lora_module, raw_tensor, run_captured, write_sld
from deltacodec import cli_progress
from deltacodec.cli_text import MAX_SAFE_INT, dumps, escape, one_line
from deltacodec.errors import SldError
from deltacodec.format import SldFile
from test_codec import make_adapter

# --------------------------------------------------------------------------------------------------
# an independent reading of the JSON representation (cli_text's module docstring)


def reject_constant(name: str):
    raise AssertionError(f"non-standard JSON token {name}")


def strict_loads(text: str):
    """json.loads that refuses NaN/Infinity tokens and non-ASCII text (RFC 8259, terminal-safe)."""
    assert text.isascii()
    return json.loads(text, parse_constant=reject_constant)


def untag(v):
    """Undo the ``$`` forms: the inverse the representation promises."""
    if isinstance(v, list):
        return [untag(x) for x in v]
    if isinstance(v, dict):
        if len(v) == 1:
            ((k, x),) = v.items()
            if k == "$bytes_hex":
                return bytes.fromhex(x)
            if k == "$float":
                assert x in ("nan", "inf", "-inf")
                return float(x)
            if k == "$int":
                assert abs(int(x)) > MAX_SAFE_INT
                return int(x)
            if k == "$timestamp":
                return msgpack.Timestamp(x["seconds"], x["nanoseconds"])
        out = {}
        for k, x in v.items():
            if k.startswith("$bytes_hex:"):
                key = bytes.fromhex(k[len("$bytes_hex:"):])
            else:
                assert not k.startswith("$") or k.startswith("$$"), k
                key = k[1:] if k.startswith("$$") else k
            out[key] = untag(x)
        return out
    assert not (isinstance(v, int) and abs(v) > MAX_SAFE_INT)
    return v


def same(a, b) -> bool:
    """Equality that tells 1 from 1.0 and True, and takes NaN equal to NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def msgpack_roundtrip(v):
    """What the reader hands back for ``v`` written into a header."""
    return msgpack.unpackb(msgpack.packb(v, use_bin_type=True), raw=False, strict_map_key=True)


KEYS = st.text(max_size=8) | st.binary(max_size=4) | st.sampled_from(
    ["$bytes_hex", "$float", "$int", "$timestamp", "$", "$$x", "$bytes_hex:00", "$repr"]
)
LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text()
    | st.binary()
    | st.builds(msgpack.Timestamp, st.integers(-(2**34), 2**34 - 1), st.integers(0, 999_999_999))
)
MSGPACK_VALUES = st.recursive(
    LEAVES, lambda c: st.lists(c, max_size=4) | st.dictionaries(KEYS, c, max_size=4), max_leaves=25
)


# --------------------------------------------------------------------------------------------------
# escape / one_line / dumps


@given(st.text())
def test_escape_is_printable_and_undone_by_pythons_unicode_escape(s):
    e = escape(s)
    assert e.isprintable()
    assert e.encode("ascii", "backslashreplace").decode("unicode_escape") == s


@pytest.mark.parametrize(
    "raw, shown",
    [("a\nb", "a\\nb"), ("\x1b[2J", "\\x1b[2J"), ("tab\there", "tab\\there"), ("cr\r", "cr\\r"),
     ("\x9b31m", "\\x9b31m"), ("bidi\u202eevil", "bidi\\u202eevil"), ("zero\u200bwidth", "zero\\u200bwidth"),
     ("\udcff", "\\udcff"), ("back\\slash", "back\\\\slash"), ("plain name.lora_A", "plain name.lora_A"),
     ("ω×γ", "ω×γ")],
)
def test_escape_shows_controls_and_invisible_characters(raw, shown):
    assert escape(raw) == shown


@given(st.text())
def test_one_line_gives_one_printable_line(s):
    line = one_line(s)
    assert line.isprintable() and "\n" not in line


@given(MSGPACK_VALUES)
def test_dumps_is_strict_json_that_inverts_to_the_value(v):
    v = msgpack_roundtrip(v)
    for indent in (2, None):
        text = dumps(v, indent=indent)
        assert same(untag(strict_loads(text)), v)
    assert "\n" not in dumps(v, indent=None)


def test_dumps_has_no_depth_limit():
    v = 1
    for _ in range(2000):  # twice what msgpack itself can nest
        v = {"k": [v]}
    text = dumps(v)
    with deep_recursion():
        back = strict_loads(text)
    depth = 0
    while isinstance(back, dict):
        back, depth = back["k"][0], depth + 1
    assert depth == 2000 and back == 1


@pytest.mark.parametrize(
    "value, text",
    [(b"\x00\xff", '{"$bytes_hex": "00ff"}'), (math.nan, '{"$float": "nan"}'), (-math.inf, '{"$float": "-inf"}'),
     (2**64 - 1, '{"$int": "18446744073709551615"}'), (2**53 - 1, "9007199254740991"),
     ({b"k": 1, "$x": 2}, '{"$bytes_hex:6b": 1, "$$x": 2}'), (np.float32(0.5), "0.5"),
     (msgpack.Timestamp(1, 2), '{"$timestamp": {"seconds": 1, "nanoseconds": 2}}'), ("é\x1b", '"\\u00e9\\u001b"')],
)
def test_dumps_representation_of_values_json_lacks(value, text):
    assert dumps(value, indent=None) == text


# --------------------------------------------------------------------------------------------------
# sld inspect: any metadata, any names


def _reader_accepts(path: str) -> bool:
    try:
        SldFile(path)
        return True
    except SldError:
        return False


@contextlib.contextmanager
def deep_recursion():
    """Room for the test's own recursive helpers (json.loads, untag, same) on 1000-deep values;
    the CLI itself runs under the default limit."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20_000))
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


def _check_inspect(path: str, want_meta) -> None:
    """inspect and inspect --json on a file: strict JSON holding the metadata exactly, and text
    whose every line is printable. A reader that refuses the file gives one escaped error line."""
    if not _reader_accepts(path):
        for args in (("inspect", path), ("inspect", path, "--json")):
            rc, out, err = run_captured(*args)
            assert_one_line_error(rc, err, path)
            assert err.rstrip("\n").isprintable()
        return
    rc, out, err = run_captured("inspect", path, "--json")
    assert rc == 0 and err == "", err
    rc_text, text, err_text = run_captured("inspect", path)
    assert rc_text == 0 and err_text == "", err_text
    assert all(line.isprintable() for line in text.splitlines())
    with deep_recursion():
        s = untag(strict_loads(out))
        assert same(s["metadata"], want_meta)
        for key in ("method", "encoder", "base_model"):
            assert same(s[key], want_meta.get(key))


# Each example writes a file and runs two commands: a third of the profile's examples (50 by
# default, ~1700 with HYPOTHESIS_PROFILE=slow).
FILE_EXAMPLES = settings(max_examples=max(10, settings.default.max_examples // 3))


@FILE_EXAMPLES
@given(metadata=st.dictionaries(KEYS, MSGPACK_VALUES, max_size=5),
       known=st.fixed_dictionaries({}, optional={k: MSGPACK_VALUES for k in ("method", "encoder", "base_model",
                                                                             "adapter_config")}))
def test_inspect_prints_any_header_metadata_as_strict_json(metadata, known):
    # Written unchecked: metadata the reader refuses (a bytes map key, an extension type, nesting
    # over the cap) must give one line, everything it accepts must print as strict JSON.
    meta = msgpack_roundtrip({**metadata, **known})
    with tempfile.TemporaryDirectory() as d:
        path = write_sld(os.path.join(d, "m.sld"), metadata=meta, checked=False)
        if _reader_accepts(path):
            _check_inspect(path, meta)
        else:
            rc, _, err = run_captured("inspect", path)
            assert_one_line_error(rc, err, path)


def _nested(depth: int):
    v = "bottom"
    for i in range(depth):
        v = [v] if i % 2 else {"k": v}
    return v


@pytest.mark.parametrize("where", ["base_model", "adapter_config", "other"])
def test_inspect_of_nested_metadata_within_the_cap(tmp_path, where):
    meta = {"method": "lora", where: _nested(20)}
    _check_inspect(write_sld(tmp_path / "deep.sld", metadata=meta), msgpack_roundtrip(meta))


@pytest.mark.parametrize("where", ["base_model", "adapter_config", "other"])
@pytest.mark.parametrize("depth", [100, 1000])
def test_inspect_of_metadata_nested_beyond_the_cap_is_one_line(tmp_path, where, depth):
    path = write_sld(tmp_path / "deep.sld", metadata={"method": "lora", where: _nested(depth)}, checked=False)
    for extra in ((), ("--json",)):
        rc, out, err = run_captured("inspect", path, *extra)
        assert out == ""
        assert_one_line_error(rc, err, path, "nest")


# Names a reader accepts but a terminal would render misleadingly; control characters (C0, DEL,
# C1) are refused by the reader, so they reach the CLI only inside metadata or as a refused name.
TRICKY = ["bidi\u202egnp.exe", "zero\u200bwidth", "back\\slash", "line\u2028sep", "sq'uote"]
CONTROL = ["q\nsld: error: forged", "clear\x1b[2J\x1b[H", "c1\x9b31m", "cr\rover", "tab\tname", "nul\x00byte"]


def _tricky_file(path) -> str:
    modules = [lora_module(name, seed=i) for i, name in enumerate(TRICKY)]
    tensors = [{"name": "extra." + name, **raw_tensor(np.ones(2), "F32")} for name in TRICKY]
    meta = {"method": "lora\x1b[31m", "encoder": "x\ny", "base_model": b"\x1b[2J", "note": CONTROL}
    return write_sld(path, metadata=meta, modules=modules, tensors=tensors)


def test_inspect_text_escapes_names_and_metadata(tmp_path):
    path = _tricky_file(tmp_path / "tricky.sld")
    rc, out, err = run_captured("inspect", path)
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert all(line.isprintable() for line in lines)
    assert not any(line.startswith("sld:") for line in lines)
    assert len(lines) == 8 + 3 * len(TRICKY)  # header lines (layout included) + one row per tensor + total + note
    assert "  method      lora\\x1b[31m    encoder x\\ny" in lines
    assert '  base model  {"$bytes_hex": "1b5b324a"}' in lines
    for name in TRICKY:
        assert any(line.startswith("  " + escape(name) + ".lora_A.weight") for line in lines), name
        assert any(line.startswith("  extra." + escape(name)) for line in lines), name


def test_inspect_json_keeps_names_and_metadata_exactly(tmp_path):
    rc, out, err = run_captured("inspect", _tricky_file(tmp_path / "tricky.sld"), "--json")
    assert rc == 0
    s = strict_loads(out)
    assert [m["name"] for m in s["modules"]] == TRICKY
    assert [t["name"] for t in s["tensors"]][-len(TRICKY):] == ["extra." + n for n in TRICKY]
    assert s["base_model"] == {"$bytes_hex": "1b5b324a"}
    assert s["metadata"]["note"] == CONTROL


@pytest.mark.parametrize("name", CONTROL)
def test_a_name_with_a_control_character_is_refused_in_one_printable_line(tmp_path, name):
    path = write_sld(tmp_path / "ctl.sld", modules=[lora_module(name)], checked=False)
    for verb in ("inspect", "verify", "stats"):
        rc, out, err = run_captured(verb, path)
        line = assert_one_line_error(rc, err, path, "control character")
        assert line.isprintable() and out == ""


@FILE_EXAMPLES
@given(st.text(min_size=1).filter(lambda n: len(n.encode("utf-8", "surrogatepass")) <= 200))
def test_inspect_escapes_any_name_the_reader_accepts(name):
    with tempfile.TemporaryDirectory() as d:
        try:
            path = write_sld(os.path.join(d, "n.sld"), tensors=[{"name": name, **raw_tensor(np.ones(2), "F32")}],
                             checked=False)
        except UnicodeEncodeError:  # a lone surrogate cannot be written as UTF-8: not a possible name
            return
        if not _reader_accepts(path):
            rc, _, err = run_captured("inspect", path)
            assert_one_line_error(rc, err, path)
            return
        rc, out, err = run_captured("inspect", path)
        assert rc == 0 and all(line.isprintable() for line in out.splitlines())
        assert any(line.startswith("  " + escape(name) + " ") for line in out.splitlines())
        rc, out, err = run_captured("inspect", path, "--json")
        assert strict_loads(out)["tensors"][0]["name"] == name


def test_stats_and_verify_escape_names(tmp_path):
    path = _tricky_file(tmp_path / "tricky.sld")
    rc, out, err = run_captured("stats", path)
    assert rc == 0, err
    assert all(line.isprintable() for line in out.splitlines())
    assert any(line.startswith(escape(TRICKY[0])) for line in out.splitlines())
    # a corrupt section in the last tensor, named with a right-to-left override
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 1
    bad = tmp_path / "tricky-bad.sld"
    bad.write_bytes(bytes(data))
    rc, out, err = run_captured("verify", str(bad))
    line = assert_one_line_error(rc, err, str(bad), "extra." + escape(TRICKY[-1]))
    assert line.isprintable()


# --------------------------------------------------------------------------------------------------
# the progress bar


class FakeTty(io.StringIO):
    def __init__(self, tty: bool = True):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


class Clock:
    def __init__(self, step: float):
        self.t, self.step = 0.0, step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


def test_progress_bar_is_drawn_on_a_tty_after_the_delay():
    stream = FakeTty()
    bar = cli_progress.ProgressBar("decode", stream=stream, delay=0.5, clock=Clock(0.2))
    bar(0, 4, "a")  # t=0.2: the start
    bar(1, 4, "b")  # t=0.4: 0.2 s of work, under the delay
    assert stream.getvalue() == ""
    bar(2, 4, "c")  # t=0.6: 0.4 s ... still under
    bar(3, 4, "d")  # t=0.8: 0.6 s, drawn
    assert stream.getvalue() == "\rdecode [######################........] 3/4"
    bar(4, 4, "")
    assert stream.getvalue().endswith("\rdecode [##############################] 4/4\n")


@pytest.mark.parametrize("tty, quiet", [(False, False), (True, True), (False, True)])
def test_progress_bar_is_silent_off_a_tty_or_when_quiet(tty, quiet):
    stream = FakeTty(tty)
    bar = cli_progress.stderr_progress("encode", quiet=quiet, stream=stream, delay=0.0, clock=Clock(1.0))
    for i in range(11):
        bar(i, 10, "m")
    assert stream.getvalue() == ""


def test_progress_bar_redraws_at_most_ten_times_a_second():
    stream = FakeTty()
    bar = cli_progress.ProgressBar("decode", stream=stream, delay=0.0, clock=Clock(0.001))
    n = 10_000  # 10 s of fake time
    for i in range(n + 1):
        bar(i, n, "m")
    draws = stream.getvalue().count("\r")
    assert 90 <= draws <= 102 and stream.getvalue().endswith(f"{n}/{n}\n")


def _encode_script(adapter, out, extra="") -> str:
    return textwrap.dedent(
        f"""
        import sys
        from deltacodec import cli_progress
        cli_progress.DEFAULT_DELAY_S = 0.0  # draw from the first step: the test does not wait
        from deltacodec.cli import main
        sys.exit(main(["encode", {str(adapter)!r}, "-o", {str(out)!r}{extra}]))
        """
    )


def test_encode_in_process_draws_the_bar_only_on_a_tty(tmp_path, monkeypatch):
    make_adapter(tmp_path / "a")
    monkeypatch.setattr(cli_progress, "DEFAULT_DELAY_S", 0.0)
    from deltacodec.cli import main

    for tty, quiet in ((True, False), (True, True), (False, False)):
        stream = FakeTty(tty)
        monkeypatch.setattr(sys, "stderr", stream)
        out = tmp_path / f"o-{tty}-{quiet}.sld"
        assert main(["encode", str(tmp_path / "a"), "-o", str(out)] + (["-q"] if quiet else [])) == 0
        drawn = stream.getvalue()
        if tty and not quiet:
            assert drawn.startswith("\rencode [") and drawn.endswith("2/2\n")
        else:
            assert drawn == ""


def test_entry_point_writes_no_progress_into_a_pipe(tmp_path):
    make_adapter(tmp_path / "a")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", _encode_script(tmp_path / "a", tmp_path / "o.sld")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and res.stderr == "" and res.stdout.startswith("wrote ")


def test_entry_point_draws_progress_on_a_terminal(tmp_path):
    pty = pytest.importorskip("pty")
    make_adapter(tmp_path / "a")
    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", _encode_script(tmp_path / "a", tmp_path / "o.sld")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert proc.wait(timeout=300) == 0
    assert b"\rencode [" in seen and b"2/2" in seen
    assert proc.stdout.read().startswith(b"wrote ")
