"""Entropy coders for ECSQ indices: size against the coded-index bound, encode and decode time.

The LLaMA-3-8B-shaped rank-16 adapter of bench_codec.py (28.3M parameters; `--layers` for
fewer) is quantized with ECSQ at a step per tensor that gives about N bits/param (N = 1..8:
"bit-equivalent" rates); the same indices are then coded by

* **rans**: deltacodec.rans, one interleaved stream (4 lanes) for all tensors, each with the
  table freqtable.best_table picks (explicit or param); size = stream + every tensor's table;
* **zstd-1** / **zstd-19**: what v1 does: symbols packed in byte-aligned fields (1, 2, 4, 8 or 16
  bits, the smallest that fits), one zstd frame per tensor;
* **constriction** (if importable; not a dependency): its ANS coder with a categorical model of
  the exact counts, one stream per tensor; size = stream + our table (a decoder needs the model).

Columns: `H` = zeroth-order entropy of each tensor's indices (bits/param, the floor no static
coder beats); `bound` = the coded-index bound (ideal code length under the rANS tables + table
bits); each coder's bits/param and its ratio to `bound`; encode and decode CPU seconds (process
time, best of 3 for decodes: wall time on a shared machine measures the neighbours). Decode =
bytes to float32 values of every tensor (rans: tables parsed and the stream decoded straight to
values; zstd: decompress, unpack, look up).

    python benchmarks/bench_v2_coder.py                 # full adapter, rates 1..8
    python benchmarks/bench_v2_coder.py --layers 4 --rates 1 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import zstandard  # noqa: E402

from bench_codec import synthetic_adapter  # noqa: E402
from deltacodec import ecsq, rans  # noqa: E402
from deltacodec.bitio import BitReader, BitWriter  # noqa: E402
from deltacodec.freqtable import FreqTable, best_table, data_bits  # noqa: E402


def step_for_rate(x: np.ndarray, bits: float) -> float:
    """Step whose ECSQ estimate is closest to ``bits`` per value (bisection on the curve)."""
    ss = ecsq.SortedSample(x, sample=16384)
    sd = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
    lo, hi = sd * 2.0**-12, sd * 8.0
    for _ in range(30):
        mid = float(np.sqrt(lo * hi))
        b, _ = ecsq.rd_estimate(ss, mid, ecsq.HIGH_RATE_MU * mid * mid)
        if b / x.size > bits:
            lo = mid
        else:
            hi = mid
    return float(np.sqrt(lo * hi))


def best_of(fn, repeat: int = 3) -> tuple[float, object]:
    """Best CPU time (process time: on a shared machine wall time measures the neighbours)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.process_time()
        out = fn()
        best = min(best, time.process_time() - t0)
    return best, out


def zstd_run(tensors, level: int) -> tuple[int, float, float]:
    frames, meta = [], []
    t0 = time.process_time()
    cctx = zstandard.ZstdCompressor(level=level)
    for q, table in tensors:
        sym = (q.indices - table.imin).astype(np.int64)
        width = next(w for w in (1, 2, 4, 8, 16) if table.size <= 1 << w)
        if width == 16:
            payload = sym.astype("<u2").tobytes()
        elif width == 8:
            payload = sym.astype(np.uint8).tobytes()
        else:
            per = 8 // width
            pad = (-sym.size) % per
            s = np.concatenate([sym, np.zeros(pad, np.int64)]).reshape(-1, per)
            packed = np.zeros(s.shape[0], np.uint8)
            for t in range(per):
                packed |= (s[:, t] << (t * width)).astype(np.uint8)
            payload = packed.tobytes()
        frames.append(cctx.compress(payload))
        meta.append((width, sym.size, table, q))
    t_enc = time.process_time() - t0
    luts = [ecsq.recon_values(t.imin, t.imax, q.step_bits, q.theta1, q.theta2) for (q, t) in tensors]

    def decode():
        d = zstandard.ZstdDecompressor()
        out = []
        for fr, (width, n, table, q), lut in zip(frames, meta, luts):
            raw = np.frombuffer(d.decompress(fr), dtype=np.uint8)
            if width == 16:
                sym = raw.view("<u2")
            elif width == 8:
                sym = raw
            else:
                per = 8 // width
                mask = np.uint8((1 << width) - 1)
                sym = np.empty((raw.size, per), np.uint8)
                for t in range(per):
                    sym[:, t] = (raw >> np.uint8(t * width)) & mask
                sym = sym.reshape(-1)[:n]
            out.append(lut[sym])
        return out

    t_dec, _ = best_of(decode)
    return sum(len(f) for f in frames), t_enc, t_dec


def constriction_run(tensors, table_bits: int):
    try:
        import constriction  # noqa: F401
    except ImportError:
        return None
    import constriction

    comps, models = [], []
    t0 = time.process_time()
    for q, table in tensors:
        sym = (q.indices - table.imin).astype(np.int32)
        c = np.bincount(sym, minlength=table.size).astype(np.float64)
        model = constriction.stream.model.Categorical(c / c.sum(), perfect=False)
        enc = constriction.stream.stack.AnsCoder()
        enc.encode_reverse(sym, model)
        comps.append(enc.get_compressed())
        models.append((model, sym.size))
    t_enc = time.process_time() - t0

    def decode():
        return [constriction.stream.stack.AnsCoder(cp).decode(m, n) for cp, (m, n) in zip(comps, models)]

    t_dec, _ = best_of(decode, 1)
    size = sum(4 * cp.size for cp in comps) + (table_bits + 7) // 8
    return size, t_enc, t_dec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rates", type=float, nargs="+", default=[1, 2, 3, 4, 5, 6, 7, 8])
    ap.add_argument("--no-constriction", action="store_true")
    args = ap.parse_args()
    adapter = synthetic_adapter(args.rank, layers=args.layers)
    xs = [t for m in adapter.modules for t in (m.A, m.B)]
    params = sum(x.size for x in xs)
    print(f"LLaMA-shaped rank-{args.rank} adapter, {args.layers} layers, {len(xs)} tensors, {params:,} params; "
          f"rANS native: {rans.native_available()}")
    print(f"{'rate':>4} {'H':>7} {'bound':>7} | {'rans':>7} {'/bound':>8} {'enc s':>6} {'dec s':>6} | "
          f"{'zstd-1':>7} {'/bound':>7} {'enc s':>6} {'dec s':>6} | {'zstd-19':>7} {'/bound':>7} | "
          f"{'constr.':>7} {'/bound':>8} {'enc s':>6} {'dec s':>6}", flush=True)
    for rate in args.rates:
        tensors = []
        h_bits = 0.0
        for x in xs:
            flat = x.reshape(-1)
            step = step_for_rate(flat, rate)
            q = ecsq.quantize(flat, step, ecsq.HIGH_RATE_MU * step * step)
            lo, hi = int(q.indices.min()), int(q.indices.max())
            c = np.bincount(q.indices - lo, minlength=hi - lo + 1)
            p = c[c > 0] / c.sum()
            h_bits += float(-(p * np.log2(p)).sum()) * flat.size
            tensors.append((q, best_table(c, lo)))
        bw = BitWriter()
        for _, t in tensors:
            t.write(bw)
        side = bw.getvalue()
        bound_bits = sum(data_bits(t, np.bincount(q.indices - t.imin, minlength=t.size)) for q, t in tensors)
        bound_bits += 8 * len(side)
        t_enc, stream = best_of(lambda: rans.encode([(q.indices, t) for q, t in tensors]), 1)

        def rans_decode():
            br = BitReader(side)
            tabs = [FreqTable.read(br) for _ in tensors]
            segs = [(q.indices.size, tb, ecsq.recon_values(tb.imin, tb.imax, q.step_bits, q.theta1, q.theta2))
                    for (q, _), tb in zip(tensors, tabs)]
            return rans.decode_values(stream, segs)

        t_dec, vals = best_of(rans_decode)
        ref = np.concatenate([q.values() for q, _ in tensors])
        assert np.array_equal(vals, ref), "rANS round trip failed"
        r_bits = 8 * (len(stream) + len(side))
        z1, z1e, z1d = zstd_run(tensors, 1)
        z19, _, _ = zstd_run(tensors, 19)
        con = None if args.no_constriction else constriction_run(tensors, 8 * len(side))
        cs = (f"{8 * con[0] / params:>7.4f} {8 * con[0] / bound_bits:>8.5f} {con[1]:>6.2f} {con[2]:>6.2f}"
              if con else f"{'-':>7} {'-':>8} {'-':>6} {'-':>6}")
        print(f"{rate:>4g} {h_bits / params:>7.4f} {bound_bits / params:>7.4f} | {r_bits / params:>7.4f} "
              f"{r_bits / bound_bits:>8.5f} {t_enc:>6.2f} {t_dec:>6.3f} | {8 * z1 / params:>7.4f} "
              f"{8 * z1 / bound_bits:>7.4f} {z1e:>6.2f} {z1d:>6.3f} | {8 * z19 / params:>7.4f} "
              f"{8 * z19 / bound_bits:>7.4f} | {cs}", flush=True)


if __name__ == "__main__":
    main()
