"""Resource bounds of the reader (issue 9, class 1): build the files, time and measure them.

    python benchmarks/bench_limits.py build DIR        # writes DIR/bomb.sld and DIR/cap.sld
    python benchmarks/bench_limits.py inspect FILE     # open (header) only
    python benchmarks/bench_limits.py verify FILE      # SldFile.verify(): every section, in pieces
    python benchmarks/bench_limits.py chunks FILE      # every tensor via SldFile.iter_chunks
    python benchmarks/bench_limits.py tensor FILE      # every tensor whole via SldFile.tensor

Each run prints wall and CPU time and peak RSS. Under a 1 GB address-space limit:
``prlimit --as=1000000000 python benchmarks/bench_limits.py verify DIR/bomb.sld``.

bomb.sld (34 KB) is valid under the spec: one module whose lora_A is a 2^30-element 8-bit index
stream stored as one zstd frame of 8192 RLE blocks: a 1 GiB payload, 4 GiB decoded to float32,
within the default 16 GiB decoded-size limit. cap.sld holds 131,072 sine modules (the entry cap)
with 3-bit codebook factors of 4x16 and 4x4 values, its header as raw zstd blocks (65 MB).
"""

from __future__ import annotations

import os
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


def main() -> None:
    cmd, arg = sys.argv[1], sys.argv[2]
    if cmd == "build":
        from sldtools import bomb_file, many_modules_file

        os.makedirs(arg, exist_ok=True)
        for name, make in (("bomb.sld", bomb_file), ("cap.sld", lambda: many_modules_file(1 << 17))):
            data = make()
            with open(os.path.join(arg, name), "wb") as fh:
                fh.write(data)
            print(f"{name}: {len(data):,} bytes")
        return
    import deltacodec
    from deltacodec import SldError

    t0, c0 = time.perf_counter(), time.process_time()
    t_open = c_open = float("nan")
    try:
        f = deltacodec.load(arg)
        t_open, c_open = time.perf_counter() - t0, time.process_time() - c0
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
        result = f"{type(exc).__name__}: {exc}"
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")] if os.path.exists("/proc/self/status") else []
    rss = int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{cmd} {os.path.basename(arg)}: {result}\n  open {t_open:.2f} s ({c_open:.2f} s CPU), "
          f"total {dt:.2f} s ({dc:.2f} s CPU), peak RSS {rss:.0f} MiB")


if __name__ == "__main__":
    main()
