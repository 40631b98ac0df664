"""What a file may demand (spec section 7.1): every limit is enforced before the allocation it
guards, violations are SldLimitError naming the file, what was asked and the limit, and decoding
runs in bounded memory whatever the file declares."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
import tracemalloc

import msgpack
import numpy as np
import pytest

from deltacodec import SldError, SldFormatError, SldLimitError, load
from deltacodec.format import (
    CHUNK_ELEMENTS,
    DEFAULT_MAX_DECODED_BYTES,
    MAX_CONTAINER,
    MAX_DEPTH,
    MAX_ENTRIES,
    MAX_METADATA_VALUES,
    MAX_NUMEL,
    SldFile,
)

from sldtools import (
    bomb_file,
    file_from_header,
    header_bytes_file,
    many_modules_file,
    parse_file,
    raw_tensor,
    relayout,
    simple_file,
    zstd_frame,
)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def write(tmp_path, data: bytes, name: str = "f.sld") -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def limit_error(tmp_path, data: bytes, limit: int, requested: int | None = None, name: str = "f.sld") -> SldLimitError:
    """The file is refused with SldLimitError carrying ``limit`` (and ``requested``), and the
    message names the file and both numbers."""
    p = write(tmp_path, data, name)
    with pytest.raises(SldError) as exc:
        SldFile(p).verify()
    e = exc.value
    assert type(e) is SldLimitError, f"{type(e).__name__}: {e}"
    assert e.limit == limit, (e.limit, str(e))
    if requested is not None:
        assert e.requested == requested, (e.requested, str(e))
    assert name in str(e) and (f"{limit:,}" in str(e) or str(limit) in str(e)), str(e)
    return e


def metadata_file(raw_metadata: list[tuple]) -> bytes:
    """A valid file whose metadata is ``{"k": V}``, V the msgpack made of ``raw_metadata``
    (zstd_frame parts, so runs of one byte cost 4 bytes per 128 KiB). V is at level 3."""
    data, _ = simple_file()
    h, secs = parse_file(data)
    rest = msgpack.packb("modules") + msgpack.packb(h["modules"], use_bin_type=True) + msgpack.packb("tensors") + b"\x90"
    parts = [("raw", b"\x83" + msgpack.packb("metadata") + b"\x81\xa1k")] + raw_metadata + [("raw", rest)]
    return header_bytes_file(zstd_frame(parts), b"".join(secs))


def array32(n: int) -> bytes:
    return b"\xdd" + struct.pack(">I", n)


# ---------------------------------------------------------------------------------------------
# Counts and nesting in the header


def test_entry_count_is_capped_before_entries_are_read(tmp_path):
    # The tensors array declares one entry too many and holds only nils: the count is refused
    # when the array header is read, before any entry is looked at (an entry would be an error).
    data, _ = simple_file()
    h, secs = parse_file(data)
    head = b"\x83" + msgpack.packb("metadata") + b"\x80" + msgpack.packb("modules") + msgpack.packb(h["modules"])
    n = MAX_ENTRIES  # plus the one module: MAX_ENTRIES + 1 entries
    raw_parts = [("raw", head + msgpack.packb("tensors") + array32(n)), ("rle", 0xC0, n)]
    limit_error(tmp_path, header_bytes_file(zstd_frame(raw_parts), b"".join(secs)), MAX_ENTRIES, MAX_ENTRIES + 1)
    # modules alone over the cap
    raw_parts = [("raw", b"\x83" + msgpack.packb("metadata") + b"\x80" + msgpack.packb("modules") + array32(n + 1)),
                 ("rle", 0xC0, n + 1), ("raw", msgpack.packb("tensors") + b"\x90")]
    limit_error(tmp_path, header_bytes_file(zstd_frame(raw_parts), b""), MAX_ENTRIES, MAX_ENTRIES + 1)


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 100, 1000, 1025, 5000])
def test_nesting_depth_is_capped(tmp_path, depth):
    # Depth counts maps and arrays, the root map being level 1 and metadata level 2: metadata
    # holding `depth - 2` nested arrays reaches level `depth`. 1000 levels crashed consumers that
    # recurse (json.dumps); now nothing that deep gets past the reader.
    n = depth - 2
    e = limit_error(tmp_path, metadata_file([("rle", 0x91, n), ("raw", b"\xc0")]), MAX_DEPTH)
    assert e.requested > MAX_DEPTH


def test_nesting_at_the_cap_is_accepted(tmp_path):
    f = SldFile(write(tmp_path, metadata_file([("rle", 0x91, MAX_DEPTH - 2), ("raw", b"\xc0")])))
    v, depth = f.metadata["k"], 3
    while isinstance(v, list):
        v, depth = v[0], depth + 1
    assert depth == MAX_DEPTH + 1 and v is None  # the nil inside the deepest (level-32) array


def test_deep_nesting_inside_an_entry_is_refused(tmp_path):
    # Inside a module map nothing nests (scale is a float): a deep value there is a format error
    # (the wrong type) or a limit error (over msgpack's stack), never a crash.
    data, _ = simple_file()
    h, secs = parse_file(data)
    for depth in (40, 1000, 3000):
        raw = msgpack.packb(h, use_bin_type=True).replace(b"\xa5scale\xcb" + struct.pack(">d", 2.0),
                                                          b"\xa5scale" + b"\x91" * depth + b"\xc0")
        p = write(tmp_path, header_bytes_file(zstd_frame([("raw", raw)]), b"".join(secs)))
        with pytest.raises((SldFormatError, SldLimitError), match="f.sld"):
            SldFile(p)


def test_container_length_is_capped(tmp_path):
    limit_error(tmp_path, metadata_file([("raw", array32(MAX_CONTAINER + 1)), ("rle", 0xC0, MAX_CONTAINER + 1)]),
                MAX_CONTAINER, MAX_CONTAINER + 1)
    # a map declaring 2^32-1 pairs in 5 bytes: refused on its header, nothing is allocated for it
    limit_error(tmp_path, metadata_file([("raw", b"\xdf\xff\xff\xff\xff")]), MAX_CONTAINER, 2**32 - 1)
    f = SldFile(write(tmp_path, metadata_file([("raw", array32(MAX_CONTAINER)), ("rle", 0xC0, MAX_CONTAINER)])))
    assert len(f.metadata["k"]) == MAX_CONTAINER


def test_metadata_value_count_is_capped(tmp_path):
    # Nine nested arrays of 2^17 elements each (after the map {"k": ...}: 2 values): over 2^20
    # values at the eighth array header, before any element is built (the rest are nils, 4 bytes
    # per 128 KiB of them).
    parts = [("raw", array32(MAX_CONTAINER) * 9 + b"\xc0")]
    parts += [("rle", 0xC0, MAX_CONTAINER - 1)] * 9
    e = limit_error(tmp_path, metadata_file(parts), MAX_METADATA_VALUES)
    assert e.requested == 2 + 8 * MAX_CONTAINER


def test_numel_is_capped(tmp_path):
    data, _ = simple_file()
    h, secs = parse_file(data)
    t, s = raw_tensor(np.ones(3, np.float32))
    t.update(name="huge", shape=[2**31 - 1, 5])
    h["tensors"].append(t)
    limit_error(tmp_path, file_from_header(relayout(h, secs + [s]), secs + [s]), MAX_NUMEL, (2**31 - 1) * 5)


# ---------------------------------------------------------------------------------------------
# zstd windows, decoded sizes


def test_zstd_window_is_capped(tmp_path):
    data, _ = simple_file()
    h, secs = parse_file(data)
    raw = msgpack.packb(h, use_bin_type=True)
    # the header frame
    limit_error(tmp_path, header_bytes_file(zstd_frame([("raw", raw)], window_log=28), b"".join(secs)), 1 << 27, 1 << 28)
    SldFile(write(tmp_path, header_bytes_file(zstd_frame([("raw", raw)], window_log=27), b"".join(secs)))).verify()
    # a section frame: the header is fine, verify refuses the section
    h["modules"][0]["A"]["compression"] = "zstd"
    for wlog, ok in ((27, True), (28, False), (31, False)):
        secs2 = [zstd_frame([("raw", secs[0])], window_log=wlog), secs[1]]
        data = file_from_header(relayout(h, secs2), secs2)
        if ok:
            SldFile(write(tmp_path, data)).verify()
        else:
            SldFile(write(tmp_path, data))  # opens: the window is a property of the section
            limit_error(tmp_path, data, 1 << 27, 1 << wlog)
    # single-segment frames: the window is the content size
    secs2 = [zstd_frame([("rle", 0, 3)], single_segment=True, content_size=(1 << 27) + 1), secs[1]]
    limit_error(tmp_path, file_from_header(relayout(h, secs2), secs2), 1 << 27, (1 << 27) + 1)


def test_decoded_size_limit_is_checked_before_decoding(tmp_path):
    # The bomb decodes to 4 GiB: under the default 16 GiB it opens; with a 1 GiB limit it is
    # refused at open, even though its only big section is also corrupt (the limit comes first).
    bomb = bomb_file()
    need = 4 * ((1 << 30) + 1)
    p = write(tmp_path, bomb, "bomb.sld")
    assert SldFile(p).decoded_nbytes == need <= DEFAULT_MAX_DECODED_BYTES
    bad = bytearray(bomb)
    bad[-10] ^= 1
    p2 = write(tmp_path, bytes(bad), "b2.sld")
    with pytest.raises(SldLimitError) as exc:
        load(p2, max_decoded_bytes=1 << 30)
    e = exc.value
    assert (e.limit, e.requested) == (1 << 30, need) and "b2.sld" in str(e) and "max_decoded_bytes" in str(e)
    assert load(p, max_decoded_bytes=need).decoded_nbytes == need
    with pytest.raises(SldLimitError):
        load(p, max_decoded_bytes=need - 1)


def test_decoded_size_counts_float64_twice(tmp_path):
    data, _ = simple_file()
    h, secs = parse_file(data)
    for dt, size in (("F16", 4), ("BF16", 4), ("F32", 4), ("F64", 8)):
        t, s = raw_tensor(np.ones(10), dt)
        t["name"] = "x"
        h2 = dict(h, tensors=[t])
        f = SldFile(write(tmp_path, file_from_header(relayout(h2, secs + [s]), secs + [s])))
        assert f.decoded_nbytes == 4 * (10 + 6) + size * 10


# ---------------------------------------------------------------------------------------------
# Bounded memory while decoding


_BOUNDED = textwrap.dedent("""
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (1_000_000_000, 1_000_000_000))
    sys.path.insert(0, {root!r})
    import numpy as np
    from deltacodec import SldLimitError, load
    f = load({path!r})
    f.verify()
    pieces = 0
    for piece in f.iter_chunks(f.modules[0].A, 1 << 20):
        assert piece.dtype == np.float32 and piece.size == 1 << 20 and (piece == -1.0).all()
        pieces += 1
        if pieces == 64:
            break
    try:
        f.tensor(f.modules[0].A)
        print("tensor: decoded whole")
    except SldLimitError as exc:
        print("tensor:", exc)
    # VmHWM: the peak RSS of this process's own memory map (ru_maxrss would include the RSS of
    # the parent at fork, e.g. a pytest that has imported torch)
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
    print("peak_kib", int(hwm[0].split()[1]) if hwm else 0)
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="measures VmHWM in /proc (Linux)")
def test_bomb_decodes_in_bounded_memory(tmp_path):
    # The 34 KB bomb under a 1 GB address-space limit: verify() decompresses the whole 1 GiB
    # payload in pieces, iter_chunks streams it, and decoding the 4 GiB tensor whole is a clean
    # SldLimitError (out of memory, with the hint), not a crash. Peak RSS stays near the
    # interpreter's own (measured ~40 MiB; the bound here leaves room for allocator slack).
    p = write(tmp_path, bomb_file(), "bomb.sld")
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _BOUNDED.format(root=ROOT, path=p)], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "tensor: " in out and "out of memory" in out and "bomb.sld" in out and "4,294,967,296 bytes" in out
    assert "max_decoded_bytes" in out
    rss_mib = int(out.split("peak_kib")[1]) / 1024
    assert rss_mib < 200, rss_mib


def test_iter_chunks_memory_is_bounded():
    # A 16 Mi-element tensor (RLE zstd, 16 MiB payload, 64 MiB as float32) decoded in pieces of
    # 1 Mi: what numpy allocates peaks at a few pieces (index bytes, intp temporaries of the
    # codebook lookup, the float32 piece), never near the whole tensor.
    import tempfile

    n = 1 << 24
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "b.sld")
        with open(p, "wb") as fh:
            fh.write(bomb_file(n))
        f = SldFile(p)
        tracemalloc.start()
        try:
            total = 0
            for piece in f.iter_chunks(f.modules[0].A, CHUNK_ELEMENTS):
                total += piece.size
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        f.close()
    assert total == n
    assert peak < 24 * CHUNK_ELEMENTS, peak  # 4 pieces' worth of float32 + intp temporaries, vs 64 MiB whole


def test_read_section_is_exactly_the_payload(tmp_path):
    # A section declared 4 MiB: read_section returns exactly that many bytes; the frame cannot make
    # it more (its blocks add up to more -> refused before decompressing).
    data = bomb_file(1 << 22)
    f = SldFile(write(tmp_path, data))
    assert len(f.read_section(f.modules[0].A)) == 1 << 22


@pytest.mark.slow
def test_file_at_the_entry_cap_opens_and_verifies(tmp_path):
    # 2^17 sine modules (2^18 sections): opens, verifies and decodes tensor by tensor; one more
    # module is a limit error. (Times measured with benchmarks/bench_limits.py; see the report.)
    p = write(tmp_path, many_modules_file(MAX_ENTRIES), "cap.sld")
    f = SldFile(p)
    assert len(f.modules) == MAX_ENTRIES
    f.verify()
    m = f.modules[-1]
    A, B = f.dequantize(m.name)
    assert A.shape == (4, 16) and B.shape == (4, 4)
    limit_error(tmp_path, many_modules_file(MAX_ENTRIES + 1), MAX_ENTRIES, MAX_ENTRIES + 1, name="over.sld")

