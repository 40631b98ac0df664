"""Resource bounds of the reader (issue 9, class 1): build the files, time and measure them.

    python benchmarks/bench_limits.py build DIR        # writes DIR/bomb.sld and DIR/cap.sld
    python benchmarks/bench_limits.py inspect FILE     # open (header) only
    python benchmarks/bench_limits.py verify FILE      # SldFile.verify(): every section, in pieces
    python benchmarks/bench_limits.py chunks FILE      # every tensor via SldFile.iter_chunks
    python benchmarks/bench_limits.py tensor FILE      # every tensor whole via SldFile.tensor

Each run prints wall time and peak RSS. Run under a 1 GB address-space limit with e.g.
``prlimit --as=1000000000 python benchmarks/bench_limits.py verify DIR/bomb.sld`` or
``/usr/bin/time -v``.

bomb.sld (~33 KB) is valid under the spec: one module whose lora_A is a 2^30-element 8-bit index
stream stored as one zstd frame of 8192 RLE blocks (128 KiB of index 0 each): a 1 GiB payload,
4 GiB once decoded to float32, within the default 16 GiB decoded-size limit. cap.sld holds
131,072 sine modules (the entry cap) with 3-bit codebook factors of 16x4 and 4x16 values.
"""

from __future__ import annotations

import os
import resource
import struct
import sys
import time
import zlib

import msgpack
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

MAGIC = b"\x89SLD\r\n\x1a\n"


def rle_frame(byte: int, total: int) -> bytes:
    """One zstd frame of RLE blocks (RFC 8878 3.1.1.2): ``total`` copies of ``byte``.

    Window 128 KiB, content size declared (8 bytes), no checksum: 18 bytes of frame header and
    4 bytes per 128 KiB block."""
    block = 1 << 17
    fhd = 0b11 << 6  # 8-byte Frame_Content_Size, not single-segment, no checksum, no dictionary
    wd = (17 - 10) << 3  # Window_Descriptor: 2^17
    out = bytearray(struct.pack("<IBB", 0xFD2FB528, fhd, wd) + struct.pack("<Q", total))
    left = total
    while left:
        n = min(block, left)
        left -= n
        out += ((n << 3) | (1 << 1) | (1 if not left else 0)).to_bytes(3, "little") + bytes([byte])
    return bytes(out)


def raw_frame(payload: bytes) -> bytes:
    """One zstd frame of raw blocks, content size declared: no compressor involved."""
    fhd = 0b11 << 6
    out = bytearray(struct.pack("<IBB", 0xFD2FB528, fhd, (17 - 10) << 3) + struct.pack("<Q", len(payload)))
    pos = 0
    while True:
        chunk = payload[pos:pos + (1 << 17)]
        pos += len(chunk)
        last = pos >= len(payload)
        out += ((len(chunk) << 3) | (1 if last else 0)).to_bytes(3, "little") + chunk
        if last:
            return bytes(out)


def container(header: dict, sections: list[bytes]) -> bytes:
    hdr = raw_frame(msgpack.packb(header, use_bin_type=True))
    return struct.pack("<8sIII", MAGIC, 1, len(hdr), zlib.crc32(hdr)) + hdr + b"".join(sections)


def tmap(shape, section, bits, width, cb, scale, comp, off):
    return {"shape": list(shape), "encoding": "codebook", "bits": bits, "width": width, "quantizer": "kmeans",
            "codebook": cb, "codebook_scale": scale, "compression": comp, "offset": off,
            "length": len(section), "crc32": zlib.crc32(section)}


def bomb() -> bytes:
    numel = 1 << 30
    sec_a = rle_frame(0, numel)  # 8-bit fields: P = numel bytes
    sec_b = b"\x00"
    cb = np.linspace(-1, 1, 256).astype("<f2").tobytes()
    m = {"name": "bomb", "kind": "lora", "out_features": 1, "in_features": numel, "rank": 1, "scale": 1.0,
         "fan_in_fan_out": False,
         "A": tmap((1, numel), sec_a, 8, 8, cb, 1.0, "zstd", 0),
         "B": tmap((1, 1), sec_b, 8, 8, cb, 1.0, "none", len(sec_a))}
    return container({"metadata": {}, "modules": [m], "tensors": []}, [sec_a, sec_b])


def at_cap(n: int = 1 << 17) -> bytes:
    rng = np.random.default_rng(0)
    cb = np.sort(rng.normal(0, 1, 8)).astype("<f2").tobytes()
    mods, secs, off = [], [], 0
    for i in range(n):
        ia = rng.integers(0, 8, 64)
        sa = bytes(np.packbits(((ia[:, None] >> np.arange(3)) & 1).astype(np.uint8).reshape(-1), bitorder="little"))
        sb = sa
        mods.append({"name": f"base_model.model.model.layers.{i // 1024}.mlp.experts.{i % 1024}.up_proj",
                     "kind": "sine", "out_features": 4, "in_features": 16, "rank": 4, "scale": 2.0,
                     "omega": 100.0, "gamma": 4.0, "fan_in_fan_out": False,
                     "A": tmap((4, 16), sa, 3, 3, cb, 0.015625, "none", off),
                     "B": tmap((4, 4 * 4), sb, 3, 3, cb, 0.015625, "none", off + len(sa))})
        mods[-1]["B"]["shape"] = [4, 4]
        mods[-1]["B"] = tmap((4, 4), sb[:6], 3, 3, cb, 0.015625, "none", off + len(sa))
        secs += [sa, sb[:6]]
        off += len(sa) + 6
    return container({"metadata": {"note": "at the entry cap"}, "modules": mods, "tensors": []}, secs)


def main() -> None:
    cmd, arg = sys.argv[1], sys.argv[2]
    if cmd == "build":
        os.makedirs(arg, exist_ok=True)
        for name, make in (("bomb.sld", bomb), ("cap.sld", at_cap)):
            data = make()
            with open(os.path.join(arg, name), "wb") as fh:
                fh.write(data)
            print(f"{name}: {len(data):,} bytes")
        return
    import deltacodec
    from deltacodec import SldError

    t0 = time.perf_counter()
    try:
        f = deltacodec.load(arg)
        t_open = time.perf_counter() - t0
        if cmd == "verify":
            f.verify()
        elif cmd == "chunks":
            for e in f.entries():
                for _ in f.iter_chunks(e):
                    pass
        elif cmd == "tensor":
            for e in f.entries():
                f.tensor(e)
        result = "ok"
    except SldError as exc:
        t_open = float("nan")
        result = f"{type(exc).__name__}: {exc}"
    dt = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{cmd} {os.path.basename(arg)}: {result}\n  open {t_open:.2f} s, total {dt:.2f} s, peak RSS {rss:.0f} MiB")


if __name__ == "__main__":
    main()
