"""Encode time with a size target (ecsq rate control) against a fixed-bits k-means encode, on the
LLaMA-3-8B-shaped synthetic adapter of bench_codec.py (issue 10: goal ≤ 2×).

    python benchmarks/bench_size_target.py [--rank 16] [--size 9700000] [--repeat 2]

Prints, per repeat, both encode times, the file sizes and their ratio. Timings depend on the
machine's load: quote ratios from one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

import deltacodec  # noqa: E402
from bench_codec import synthetic_adapter  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--size", type=int, default=9_700_000, help="target bytes")
    p.add_argument("--bits", type=int, default=3, help="the k-means encode to compare with")
    p.add_argument("--repeat", type=int, default=2)
    a = p.parse_args()
    adapter = synthetic_adapter(a.rank)
    params = sum(m.A.size + m.B.size for m in adapter.modules)
    print(f"rank {a.rank}: {params:,} parameters")
    print(f"{'k-means s':>10} {'bytes':>12} {'size-target s':>14} {'bytes':>12} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as d:
        for i in range(a.repeat):
            t = time.perf_counter()
            k = deltacodec.encode(adapter, bits=a.bits, out=os.path.join(d, f"k{i}.sld"))
            tk = time.perf_counter() - t
            t = time.perf_counter()
            s = deltacodec.encode(adapter, size=a.size, out=os.path.join(d, f"s{i}.sld"))
            ts = time.perf_counter() - t
            print(f"{tk:>10.2f} {os.path.getsize(k):>12,} {ts:>14.2f} {os.path.getsize(s):>12,} {ts / tk:>6.2f}")


if __name__ == "__main__":
    main()
